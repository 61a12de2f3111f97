r"""DPO and TRL's family of reference-based pairwise losses (TRL `DPOTrainer`, v1.16).

Notation (K = 2: index 0 chosen, 1 rejected; all [B]):

  rho_c = logpi(y_c|x) - logpi_ref(y_c|x),   rho_r likewise            (summed completion log-probs)
  s = f(rho)   the f-divergence score map (Wang et al. 2023, "Beyond Reverse KL", f-DPO):
      reverse_kl        s = rho
      forward_kl        s = 1 - exp(-rho)
      js_divergence     s = log 2 + log sigmoid(rho)
      alpha_divergence  s = (exp((a - 1) rho) - 1) / (a - 1)              a = f_alpha_divergence_coef
  delta = s_c - s_r,   z = beta * delta,   eps = label_smoothing,   sigma = logistic

  loss_type      per-example loss                                                   paper
  sigmoid        -(1 - eps) log sig(z) - eps log sig(-z)                             DPO; cDPO when eps > 0
  hinge          relu(1 - z)                                                         SLiC
  ipo            (s_c/|y_c| - s_r/|y_r| - 1/(2 beta))^2                              IPO (per-token average)
  exo_pair       q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps), q = sig(+-z)  EXO (eps > 0)
  nca_pair       -log sig(beta rho_c) - 1/2 log sig(-beta rho_c) - 1/2 log sig(-beta rho_r)   NCA
  robust         [-(1 - eps) log sig(z) + eps log sig(-z)] / (1 - 2 eps)             rDPO
  bco_pair       -log sig(beta rho_c) - log sig(-beta rho_r)                          BCO (no reward shift)
  sppo_hard      (rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2                       SPPO (hard labels)
  aot            cDPO on sort_B(logpi_c - logpi_r) - sort_B(logpi_ref_c - logpi_ref_r)  AOT (batch-level)
  aot_unpaired   cDPO on sort_B(rho_c) - sort_B(rho_r)                               AOT unpaired
  apo_zero       1 - sig(beta rho_c) + sig(beta rho_r)                                APO-zero
  apo_down       sig(beta rho_c) + 1 - sig(beta (rho_c - rho_r))                      APO-down
  discopop       (1 - m)(-log sig(z)) + m exp(-z),  m = sig(z / tau)                  DiscoPOP
  sft            mean over chosen completion tokens of -log pi(y_t)                   (batch scalar)
  sigmoid_norm   -log sig(beta (s_c/|y_c| - s_r/|y_r|))                               LN-DPO

`cfg.loss_type` is a tuple of these names and the loss is `sum_t w_t * mean_B(loss_t)` with
`cfg.loss_weights`. **RPO** (Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF") is
`loss_type=("sigmoid", "sft"), loss_weights=(1.0, alpha)`, TRL's replacement for its removed `rpo_alpha`.

Switches (TRL names):
- `ld_alpha` (LD-DPO, Liu et al. 2024): logpi = sum over the first min(|y_c|, |y_r|) completion tokens
  + ld_alpha * sum over the rest, for policy and reference. Needs `token_logps`/`mask` of both (the
  reference must carry per-token log-probs, which precomputed-only references lack).
- `use_weighting` (WPO, Zhou et al. 2024): each per-example loss is multiplied by the constant
  w = exp(mean_t[logp_t - log sum_v p_v^2])_c * exp(...)_r. This needs log sum_v p_v(t)^2 per token:
  `policy["log_sum_sq_probs"] [B, K, T]` (= logsumexp(2 log_softmax(logits))), or `policy["logits"]`
  from which it is computed.

Differences from TRL, on purpose: TRL v1.16 ignores `label_smoothing` for `sigmoid`; here eps > 0 gives the
conservative cDPO loss (Mitchell 2023; Tunix, older TRL). With eps = 0 (the default) the two agree.
The reward metrics use rho (not the f-divergence scores), as TRL does.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from losses._registry import register

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# f-DPO leaves a beta*log Z(x) term that cancels only in s_c - s_r: the other losses have no f-variant.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})


class Pair(NamedTuple):
  """Per-example terms of a chosen/rejected pair; all [B] except `nll_c` (a batch scalar)."""
  logps_c: jax.Array   # policy log-probs (summed, or LD-weighted)
  logps_r: jax.Array
  ref_c: jax.Array     # reference log-probs
  ref_r: jax.Array
  s_c: jax.Array       # f-divergence scores of the log-ratios (= rho for reverse KL)
  s_r: jax.Array
  len_c: jax.Array     # completion lengths, >= 1
  len_r: jax.Array
  nll_c: jax.Array     # mean NLL over all chosen completion tokens of the batch

  @property
  def rho_c(self):
    return self.logps_c - self.ref_c

  @property
  def rho_r(self):
    return self.logps_r - self.ref_r


class Hyper(NamedTuple):
  beta: float
  eps: float      # label_smoothing
  tau: float      # discopop_tau


def _ls(x):
  return jax.nn.log_sigmoid(x)


def cdpo(z, eps):
  """Conservative DPO: the sigmoid loss against labels smoothed by eps."""
  return -(1.0 - eps) * _ls(z) - eps * _ls(-z)


# ---------------------------------------------------------------------------------------------------
# One small function per loss_type: (Pair, Hyper) -> [B]. They read like the table above.
# ---------------------------------------------------------------------------------------------------
def _sigmoid(p, h):
  return cdpo(h.beta * (p.s_c - p.s_r), h.eps)


def _hinge(p, h):
  return jax.nn.relu(1.0 - h.beta * (p.s_c - p.s_r))


def _ipo(p, h):
  return (p.s_c / p.len_c - p.s_r / p.len_r - 1.0 / (2.0 * h.beta)) ** 2


def _exo_pair(p, h):
  z = h.beta * (p.s_c - p.s_r)
  return (jax.nn.sigmoid(z) * (_ls(z) - math.log1p(-h.eps))
          + jax.nn.sigmoid(-z) * (_ls(-z) - math.log(h.eps)))


def _nca_pair(p, h):
  rc, rr = h.beta * p.rho_c, h.beta * p.rho_r
  return -_ls(rc) - 0.5 * _ls(-rc) - 0.5 * _ls(-rr)


def _robust(p, h):
  z = h.beta * (p.s_c - p.s_r)
  return (-(1.0 - h.eps) * _ls(z) + h.eps * _ls(-z)) / (1.0 - 2.0 * h.eps)


def _bco_pair(p, h):
  return -_ls(h.beta * p.rho_c) - _ls(-h.beta * p.rho_r)


def _sppo_hard(p, h):
  return (p.rho_c - 0.5 / h.beta) ** 2 + (p.rho_r + 0.5 / h.beta) ** 2


def _aot(p, h):
  d = jnp.sort(p.logps_c - p.logps_r, axis=0) - jnp.sort(p.ref_c - p.ref_r, axis=0)
  return cdpo(h.beta * d, h.eps)


def _aot_unpaired(p, h):
  d = jnp.sort(p.rho_c, axis=0) - jnp.sort(p.rho_r, axis=0)
  return cdpo(h.beta * d, h.eps)


def _apo_zero(p, h):
  return 1.0 - jax.nn.sigmoid(h.beta * p.rho_c) + jax.nn.sigmoid(h.beta * p.rho_r)


def _apo_down(p, h):
  return jax.nn.sigmoid(h.beta * p.rho_c) + 1.0 - jax.nn.sigmoid(h.beta * (p.rho_c - p.rho_r))


def _discopop(p, h):
  z = h.beta * (p.s_c - p.s_r)
  m = jax.nn.sigmoid(z / h.tau)
  return (1.0 - m) * -_ls(z) + m * jnp.exp(-z)


def _sft(p, h):
  del h
  return jnp.broadcast_to(p.nll_c, p.logps_c.shape)


def _sigmoid_norm(p, h):
  return -_ls(h.beta * (p.s_c / p.len_c - p.s_r / p.len_r))


LOSS_TYPES: dict[str, Callable[[Pair, Hyper], jax.Array]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down,
    "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}


# ---------------------------------------------------------------------------------------------------
# Building blocks shared by the pairwise losses.
# ---------------------------------------------------------------------------------------------------
def f_divergence_scores(rho, f_divergence_type="reverse_kl", alpha=0.5):
  """The score map s(rho) of f-DPO; see the module docstring."""
  if f_divergence_type == "reverse_kl":
    return rho
  if f_divergence_type == "forward_kl":
    return 1.0 - jnp.exp(-rho)
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + _ls(rho)
  if f_divergence_type == "alpha_divergence":
    if abs(alpha - 1.0) < 1e-6:  # the limit a -> 1 is reverse KL
      return rho
    # The clamp keeps exp() finite in float32, as TRL does.
    return (jnp.exp(jnp.minimum((alpha - 1.0) * rho, 80.0)) - 1.0) / (alpha - 1.0)
  raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {F_DIVERGENCES}")


def masked_token_mean(token_values, mask):
  """sum(v * mask) / sum(mask) over every axis: TRL's mean over the non-ignored tokens of a batch."""
  return (token_values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def ld_logps(token_logps, mask, ld_alpha):
  """LD-DPO log-probs [B, K]: full weight on the first min_k |y_k| completion tokens, ld_alpha after."""
  pos = jnp.cumsum(mask, axis=-1)                                # 1-based index among completion tokens
  shared = mask.sum(-1).min(axis=1)[:, None, None]               # [B, 1, 1]
  weight = mask * jnp.where(pos <= shared, 1.0, ld_alpha)
  return (token_logps * weight).sum(-1)


def log_sum_sq_probs(outputs):
  """log sum_v p_v^2 per token [B, K, T], from `log_sum_sq_probs` or else from `logits`."""
  if "log_sum_sq_probs" in outputs:
    return outputs["log_sum_sq_probs"]
  if "logits" in outputs:
    logp = jax.nn.log_softmax(outputs["logits"].astype(jnp.promote_types(outputs["logits"].dtype,
                                                                          jnp.float32)), axis=-1)
    return jax.nn.logsumexp(2.0 * logp, axis=-1)
  raise ValueError("use_weighting (WPO) needs policy['log_sum_sq_probs'] [B, K, T] "
                   "(logsumexp(2*log_softmax(logits)) per token) or policy['logits']")


def wpo_weights(outputs):
  """WPO weights [B]: exp(mean_t[logp_t - log sum_v p_v^2]) of chosen times rejected, held constant."""
  mask = outputs["mask"]
  aligned = ((outputs["token_logps"] - log_sum_sq_probs(outputs)) * mask).sum(-1)
  w = jnp.exp(aligned / jnp.maximum(mask.sum(-1), 1.0))
  return jax.lax.stop_gradient(w[:, 0] * w[:, 1])


def reward_metrics(rewards_c, rewards_r, logps_c, logps_r):
  """TRL's pairwise metrics (batch means, no gradient)."""
  rc, rr, lc, lr = map(jax.lax.stop_gradient, (rewards_c, rewards_r, logps_c, logps_r))
  return {
      "rewards/chosen": rc.mean(),
      "rewards/rejected": rr.mean(),
      "rewards/margins": (rc - rr).mean(),
      "rewards/accuracies": (rc > rr).astype(rc.dtype).mean(),
      "logps/chosen": lc.mean(),
      "logps/rejected": lr.mean(),
  }


def _as_tuple(x):
  return (x,) if isinstance(x, str) else tuple(x)


def _check(loss_types, weights, f_type, eps, use_weighting):
  unknown = [t for t in loss_types if t not in LOSS_TYPES]
  if unknown:
    raise ValueError(f"unknown loss_type {unknown}; valid: {sorted(LOSS_TYPES)}")
  if len(weights) != len(loss_types):
    raise ValueError(f"loss_weights {weights} must match loss_type {loss_types} in length")
  if f_type not in F_DIVERGENCES:
    raise ValueError(f"unknown f_divergence_type {f_type!r}; valid: {F_DIVERGENCES}")
  if f_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
    raise ValueError(f"f_divergence_type={f_type!r} only works with {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
                     f"got {loss_types}")
  if "exo_pair" in loss_types and not 0.0 < eps < 1.0:
    raise ValueError("exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)")
  if "robust" in loss_types and not 0.0 <= eps < 0.5:
    raise ValueError("robust needs 0 <= label_smoothing < 0.5")
  if use_weighting and {"aot", "aot_unpaired"} & set(loss_types):
    raise ValueError("use_weighting (WPO) does not apply to aot losses: they sort the batch")


@register("dpo", needs=("reference",), kind="pairwise",
          needs_fn=lambda cfg: ("log_sum_sq_probs",) if cfg.get("use_weighting", False) else ())
def dpo_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array],
             batch: Mapping[str, Any], cfg) -> tuple[jax.Array, dict]:
  """TRL's DPO loss family; `cfg`: loss_type, loss_weights, beta, label_smoothing, f_divergence_type,
  f_alpha_divergence_coef, discopop_tau, ld_alpha, use_weighting (see the module docstring)."""
  del batch
  loss_types = _as_tuple(cfg.get("loss_type", ("sigmoid",)))
  weights = tuple(cfg.get("loss_weights", None) or (1.0,) * len(loss_types))
  h = Hyper(cfg.get("beta", 0.1), cfg.get("label_smoothing", 0.0), cfg.get("discopop_tau", 0.05))
  f_type = cfg.get("f_divergence_type", "reverse_kl")
  use_weighting = cfg.get("use_weighting", False)
  ld_alpha = cfg.get("ld_alpha", None)
  _check(loss_types, weights, f_type, h.eps, use_weighting)

  if ld_alpha is None:
    logps, ref = policy["logps"], reference["logps"]
  else:
    logps = ld_logps(policy["token_logps"], policy["mask"], ld_alpha)
    ref = ld_logps(reference["token_logps"], reference["mask"], ld_alpha)
  ref = jax.lax.stop_gradient(ref)
  scores = f_divergence_scores(logps - ref, f_type, cfg.get("f_alpha_divergence_coef", 0.5))
  lengths = jnp.maximum(policy["lengths"], 1.0)
  nll_c = (masked_token_mean(-policy["token_logps"][:, 0], policy["mask"][:, 0])
           if "sft" in loss_types else jnp.zeros((), logps.dtype))
  p = Pair(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], scores[:, 0], scores[:, 1],
           lengths[:, 0], lengths[:, 1], nll_c)
  example_weight = wpo_weights(policy) if use_weighting else 1.0

  loss, metrics = 0.0, {}
  for name, w in zip(loss_types, weights):
    term = (LOSS_TYPES[name](p, h) * example_weight).mean()
    metrics[f"loss/{name}"] = jax.lax.stop_gradient(term)
    loss = loss + w * term
  metrics.update(reward_metrics(h.beta * p.rho_c, h.beta * p.rho_r, p.logps_c, p.logps_r))
  return loss, metrics
