r"""Unpaired preference losses: KTO and BCO. Each example is one completion with a binary label.

Batch layout: `batch["label"] [B]` bool (True = desirable); the completion is index 0 of the Outputs
(`logps [B, K]`). rho = logpi(y|x) - logpi_ref(y|x), beta = 0.1.

**KTO** (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; TRL
`KTOTrainer`):
    z0 = max(0, mean_B[logpi(y'|x) - logpi_ref(y'|x)])       held constant (stop_gradient)
    desirable     w_d * (1 - sig(beta (rho - z0)))
    undesirable   w_u * (1 - sig(beta (z0 - rho)))
    loss = mean over the B examples                          w_d = w_u = 1.0
  z0 estimates KL(pi || pi_ref) from *mismatched* pairs (x_i, y'_i), y'_i the completion of another
  example of the batch (TRL pairs each prompt with a neighbour's completion in a fixed-order batch). The
  batch provides their summed log-probs in one of two ways:
    - `policy["kl_logps"] [B]` and `reference["kl_logps"] [B]`, from a separate (no-grad) forward pass; or
    - as a second sequence per example, `logps[:, 1]` (K = 2), so the ordinary batched forward computes
      them; the loss detaches them.
  `loss_type="apo_zero_unpaired"` (APO-zero, unpaired) drops z0: 1 - sig(beta rho) / sig(beta rho).

**BCO** (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment"; removed from TRL v1.x,
formula of its last `BCOTrainer`):
    r = beta * rho,   delta = running mean of the per-step batch mean of r (the reward shift)
    desirable     -log sig(r - delta)
    undesirable   -w_udm * log sig(-(r - delta))
    loss = mean over the B examples
  The running mean is trainer state, not part of this pure function. The trainer passes the previous
  value and the number of steps averaged so far in `batch["bco_reward_shift"]` and `batch["bco_steps"]`
  (both default 0: the first step's shift is its own batch mean); the loss includes the current batch
  mean exactly as TRL's `RunningMoments` does (update, then use) and returns the new values in
  `metrics["bco/reward_shift"]` and `metrics["bco/steps"]` for the trainer to store.
  Underlying-distribution matching (UDM) reweights undesirable examples by a density ratio from a
  prompt-embedding classifier trained outside the loss; pass it as `batch["bco_udm_weight"] [B]`.
  The paired form without a shift is `dpo` with `loss_type="bco_pair"`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from losses._registry import register

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _masked_mean(x, m):
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def unpaired_metrics(rewards, logps, desirable):
  """TRL's KTO metrics: means over the desirable and the undesirable examples (0 when there are none)."""
  rewards, logps = jax.lax.stop_gradient(rewards), jax.lax.stop_gradient(logps)
  d = desirable.astype(rewards.dtype)
  u = 1.0 - d
  rc, rr = _masked_mean(rewards, d), _masked_mean(rewards, u)
  return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
          "logps/chosen": _masked_mean(logps, d), "logps/rejected": _masked_mean(logps, u),
          "count/chosen": d.sum(), "count/rejected": u.sum()}


def kl_estimate(policy, reference):
  """KTO's z0 from the mismatched completions: max(0, mean(logpi - logpi_ref)), detached."""
  if "kl_logps" in policy:
    kl_pol, kl_ref = policy["kl_logps"], reference["kl_logps"]
  elif policy["logps"].shape[1] == 2:
    kl_pol, kl_ref = policy["logps"][:, 1], reference["logps"][:, 1]
  else:
    raise ValueError("KTO needs the log-probs of mismatched completions: policy/reference['kl_logps'] "
                     "[B], or a second sequence per example (K = 2)")
  return jax.lax.stop_gradient(jnp.maximum((kl_pol - kl_ref).mean(), 0.0))


@register("kto", needs=("reference",), kind="unpaired")
def kto_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array],
             batch: Mapping[str, Any], cfg):
  """KTO; `cfg`: loss_type (kto|apo_zero_unpaired), beta, desirable_weight, undesirable_weight."""
  loss_type = cfg.get("loss_type", "kto")
  if loss_type not in KTO_LOSS_TYPES:
    raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: {KTO_LOSS_TYPES}")
  beta = cfg.get("beta", 0.1)
  desirable = jnp.asarray(batch["label"], bool)
  logps = policy["logps"][:, 0]
  rho = logps - jax.lax.stop_gradient(reference["logps"][:, 0])
  if loss_type == "kto":
    z0 = kl_estimate(policy, reference)
    good, bad = 1.0 - jax.nn.sigmoid(beta * (rho - z0)), 1.0 - jax.nn.sigmoid(beta * (z0 - rho))
  else:
    z0 = jnp.zeros((), rho.dtype)
    good, bad = 1.0 - jax.nn.sigmoid(beta * rho), jax.nn.sigmoid(beta * rho)
  per_example = jnp.where(desirable, cfg.get("desirable_weight", 1.0) * good,
                          cfg.get("undesirable_weight", 1.0) * bad)
  metrics = unpaired_metrics(beta * rho, logps, desirable)
  metrics["kl"] = z0
  return per_example.mean(), metrics


def bco_reward_shift(prev_shift, prev_steps, batch_mean):
  """Running mean of per-step batch-mean rewards after one more step: (shift, steps)."""
  steps = prev_steps + 1.0
  return prev_shift + (batch_mean - prev_shift) / steps, steps


@register("bco", needs=("reference",), kind="unpaired",
          carry=(("bco/reward_shift", "bco_reward_shift"), ("bco/steps", "bco_steps")))
def bco_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array],
             batch: Mapping[str, Any], cfg):
  """BCO; `cfg`: beta. Batch: label, optional bco_reward_shift, bco_steps, bco_udm_weight."""
  beta = cfg.get("beta", 0.1)
  desirable = jnp.asarray(batch["label"], bool)
  logps = policy["logps"][:, 0]
  r = beta * (logps - jax.lax.stop_gradient(reference["logps"][:, 0]))
  shift, steps = bco_reward_shift(jnp.asarray(batch.get("bco_reward_shift", 0.0), r.dtype),
                                  jnp.asarray(batch.get("bco_steps", 0.0), r.dtype),
                                  jax.lax.stop_gradient(r).mean())
  udm = batch.get("bco_udm_weight", 1.0)
  per_example = jnp.where(desirable, -jax.nn.log_sigmoid(r - shift),
                          -udm * jax.nn.log_sigmoid(-(r - shift)))
  metrics = unpaired_metrics(r, logps, desirable)
  metrics.update({"bco/reward_shift": shift, "bco/steps": steps})
  return per_example.mean(), metrics
