r"""Listwise preference losses over K completions per prompt: LiPO-lambda, ListNet, ListMLE, PRO.

Batch: `scores [B, K]` labels psi (higher = better, ties allowed) and optional `list_mask [B, K]` (1 = a real
entry, for lists shorter than K). Model scores are the implicit rewards s_i = beta (logpi(y_i) -
logpi_ref(y_i)) (beta = 0.1), except PRO, which is reference-free. Each list's loss is a sum over its
pairs / positions; the batch loss is the mean over lists. Pairs whose labels tie contribute nothing.

**LiPO-lambda** (Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank"):
    L = - sum_{i,j: psi_i > psi_j} Delta_ij log sig(s_i - s_j)
    Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|,   G = 2^psi - 1,   D(tau) = log2(1 + tau)
  tau_i is the 1-based rank of y_i when the (valid) list is sorted by the current scores s, descending
  (ties broken by position); Delta is a constant (stop_gradient). With K = 2 and labels (psi_c, psi_r),
  Delta = |2^psi_c - 2^psi_r| (1 - 1/log2 3), so LiPO is that constant times the DPO sigmoid loss.

**ListNet** (Cao et al. 2007): cross-entropy between the top-one probabilities of the labels and of the
scores, - sum_i softmax(psi / T)_i log softmax(s)_i (T = listnet_temperature, 1.0), over valid entries.

**ListMLE / DPO-PL** (Xia et al. 2008; Plackett-Luce): with pi the label order (descending, stable),
    L = - sum_k [ s_{pi_k} - logsumexp_{j >= k} s_{pi_j} ]
  masked entries are -inf inside the logsumexp and are ranked last; tied labels keep their positions.

**PRO** (Song et al. 2024, "Preference Ranking Optimization for Human Alignment", reference code
AlibabaResearch/DAMO-ConvAI PRO): reference-free, r_i = logpi(y_i) / |y_i|. For every anchor k with at
least one strictly worse valid y_j, with dynamic temperatures T_kj = psi_k - psi_j and T_kk = max_j T_kj:
    L_k = logsumexp({r_k T_kk} u {r_j T_kj : psi_j < psi_k}) - r_k T_kk
  (`pro_dynamic_temperature=False` sets every T to 1, PRO without temperature), plus
    sft_weight (n - 1)^2 * (-logpi(y_best))       n = valid list length, sft_weight = 0.05
  With strictly ordered labels the negatives of y_k are exactly the entries after it, as in the paper.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from losses._registry import register


def _list_mask(batch, shape):
  m = batch.get("list_mask", None)
  return jnp.ones(shape, bool) if m is None else jnp.asarray(m, bool)


def implicit_rewards(policy, reference, beta):
  return beta * (policy["logps"] - jax.lax.stop_gradient(reference["logps"]))


def _better_pairs(psi, valid):
  """[B, K, K]: i is valid, j is valid and psi_i > psi_j."""
  return (psi[:, :, None] > psi[:, None, :]) & valid[:, :, None] & valid[:, None, :]


def ranks_by_score(s, valid):
  """1-based rank of each entry under s descending (ties by position); invalid entries rank last."""
  order = jnp.argsort(jnp.where(valid, -s, jnp.inf), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1) + 1


def lambda_weights(s, psi, valid):
  """LiPO's Delta_ij [B, K, K] (constant), zero where psi_i <= psi_j or an entry is invalid."""
  s = jax.lax.stop_gradient(s)
  gain = 2.0 ** psi - 1.0
  inv_discount = 1.0 / jnp.log2(1.0 + ranks_by_score(s, valid).astype(s.dtype))
  delta = (jnp.abs(gain[:, :, None] - gain[:, None, :])
           * jnp.abs(inv_discount[:, :, None] - inv_discount[:, None, :]))
  return jnp.where(_better_pairs(psi, valid), delta, 0.0)


def lipo_lambda(s, psi, valid):
  """Per-list LiPO-lambda loss [B]."""
  pair = jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])
  return -(lambda_weights(s, psi, valid) * pair).sum((1, 2))


def listnet(s, psi, valid, temperature=1.0):
  """Per-list ListNet loss [B]."""
  target = jax.nn.softmax(psi / temperature, axis=-1, where=valid)
  log_p = jax.nn.log_softmax(s, axis=-1, where=valid)
  return -jnp.where(valid, target * log_p, 0.0).sum(-1)


def listmle(s, psi, valid):
  """Per-list ListMLE (Plackett-Luce) loss [B]."""
  order = jnp.argsort(jnp.where(valid, -psi, jnp.inf), axis=-1, stable=True)
  s_sorted = jnp.take_along_axis(s, order, axis=-1)
  v_sorted = jnp.take_along_axis(valid, order, axis=-1)
  k = s.shape[-1]
  later = jnp.arange(k)[None, :] >= jnp.arange(k)[:, None]            # [k, j]: j >= k
  # The diagonal stays in so that no row is empty (an all -inf logsumexp has a NaN gradient).
  tail = later[None] & (v_sorted[:, None, :] | jnp.eye(k, dtype=bool)[None])
  lse = jax.nn.logsumexp(jnp.broadcast_to(s_sorted[:, None, :], tail.shape), axis=-1, where=tail)
  return -jnp.where(v_sorted, s_sorted - lse, 0.0).sum(-1)


def pro(r, psi, valid, dynamic_temperature=True):
  """Per-list PRO ranking loss [B] (without the SFT term)."""
  worse = _better_pairs(psi, valid)                                   # [B, k, j]: psi_k > psi_j
  temp = psi[:, :, None] - psi[:, None, :] if dynamic_temperature else jnp.ones_like(worse, r.dtype)
  t_anchor = jnp.max(jnp.where(worse, temp, -jnp.inf), axis=-1)       # [B, k]
  has_neg = worse.any(-1)
  t_anchor = jnp.where(has_neg, t_anchor, 1.0)
  anchor = r * t_anchor
  logits = jnp.concatenate([anchor[..., None], r[:, None, :] * temp], axis=-1)
  keep = jnp.concatenate([jnp.ones_like(has_neg)[..., None], worse], axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1, where=keep)
  return jnp.where(has_neg, lse - anchor, 0.0).sum(-1)


def ranking_metrics(s, psi, valid, logps):
  """Pairwise ranking accuracy of s against the labels, and the reward / log-prob of the top entry."""
  s, logps = jax.lax.stop_gradient(s), jax.lax.stop_gradient(logps)
  better = _better_pairs(psi, valid)
  correct = (better & (s[:, :, None] > s[:, None, :])).sum()
  top = jnp.argmax(jnp.where(valid, psi, -jnp.inf), axis=-1)[:, None]
  return {"rewards/accuracies": correct / jnp.maximum(better.sum(), 1),
          "rewards/chosen": jnp.take_along_axis(s, top, -1).mean(),
          "logps/chosen": jnp.take_along_axis(logps, top, -1).mean()}


def _labels(batch, s):
  """Labels, validity mask, and s with padded entries zeroed (they may hold anything)."""
  valid = _list_mask(batch, s.shape)
  psi = jnp.where(valid, jnp.asarray(batch["scores"], s.dtype), 0.0)
  return jnp.where(valid, s, 0.0), psi, valid


@register("lipo", needs=("reference",), kind="listwise")
def lipo_loss(policy, reference, batch: Mapping[str, Any], cfg):
  """LiPO-lambda; `cfg`: beta."""
  s = implicit_rewards(policy, reference, cfg.get("beta", 0.1))
  s, psi, valid = _labels(batch, s)
  return lipo_lambda(s, psi, valid).mean(), ranking_metrics(s, psi, valid, policy["logps"])


@register("listnet", needs=("reference",), kind="listwise")
def listnet_loss(policy, reference, batch: Mapping[str, Any], cfg):
  """ListNet; `cfg`: beta, listnet_temperature."""
  s = implicit_rewards(policy, reference, cfg.get("beta", 0.1))
  s, psi, valid = _labels(batch, s)
  loss = listnet(s, psi, valid, cfg.get("listnet_temperature", 1.0)).mean()
  return loss, ranking_metrics(s, psi, valid, policy["logps"])


@register("listmle", needs=("reference",), kind="listwise")
def listmle_loss(policy, reference, batch: Mapping[str, Any], cfg):
  """ListMLE (DPO-PL); `cfg`: beta."""
  s = implicit_rewards(policy, reference, cfg.get("beta", 0.1))
  s, psi, valid = _labels(batch, s)
  return listmle(s, psi, valid).mean(), ranking_metrics(s, psi, valid, policy["logps"])


@register("pro", kind="listwise")
def pro_loss(policy, reference, batch: Mapping[str, Any], cfg):
  """PRO; `cfg`: sft_weight (0.05), pro_dynamic_temperature (True)."""
  del reference
  logps = policy["logps"]
  r = logps / jnp.maximum(policy["lengths"], 1.0)
  r, psi, valid = _labels(batch, r)
  rank = pro(r, psi, valid, cfg.get("pro_dynamic_temperature", True))
  best = jnp.argmax(jnp.where(valid, psi, -jnp.inf), axis=-1)[:, None]
  n = valid.sum(-1).astype(r.dtype)
  sft = -jnp.take_along_axis(logps, best, -1)[:, 0] * (n - 1.0) ** 2
  loss = (rank + cfg.get("sft_weight", 0.05) * sft).mean()
  metrics = ranking_metrics(r, psi, valid, logps)
  metrics.update({"pro/rank_loss": jax.lax.stop_gradient(rank.mean()),
                  "pro/sft_loss": jax.lax.stop_gradient(sft.mean())})
  return loss, metrics
