r"""Reference-free pairwise losses: CPO, SimPO (and AlphaPO), ORPO. No reference model is run.

Notation: lp = summed completion log-prob, avg = lp / |y| (per-token average), index 0 chosen, 1 rejected,
NLL = mean over all chosen completion tokens of the batch of -log pi(y_t), eps = label_smoothing.

**CPO** (Xu et al. 2024, "Contrastive Preference Optimization"; TRL `experimental/cpo`):
    r = lp  (avg for loss_type ipo and simpo);  with AlphaPO's `alpha != 0`:  r = (1 - p^-alpha)/alpha,
    p = exp(r)  (Gupta et al. 2025, "AlphaPO")
    u = r_c - r_r   (minus simpo_gamma / beta for simpo)
    sigmoid / simpo   -(1 - eps) log sig(beta u) - eps log sig(-beta u)
    hinge             relu(1 - beta u)
    ipo               (u - 1/(2 beta))^2
    loss = mean_B(.) + cpo_alpha * NLL                 cpo_alpha = 1.0, beta = 0.1
  `loss_type="alphapo"` is TRL's shorthand for simpo with cpo_alpha = 0.

**SimPO** (Meng et al. 2024): -log sig(beta (avg_c - avg_r) - gamma). Registered separately as `"simpo"`
with the paper's defaults: beta = 2.0, simpo_gamma = 1.0 (gamma/beta = 0.5, the README's starting point)
and cpo_alpha = 0, because TRL's CPO-simpo adds the NLL unless cpo_alpha = 0.

**ORPO** (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model";
TRL `experimental/orpo`):
    log_odds = (avg_c - avg_r) - (log(1 - e^avg_c) - log(1 - e^avg_r))
    loss = NLL - beta * mean_B log sig(log_odds)          beta (the paper's lambda) = 0.1
  avg is clipped at <= -1e-7 before log(1 - e^avg), as Tunix does, so a certain completion cannot make
  the odds infinite. TRL's ORPO takes its NLL over prompt *and* completion tokens; ours is over the
  completion tokens (`mask`), the SFT term of the paper; the two agree when the prompt is one token.

Rewards in the metrics are beta * r (beta * avg for ORPO), as in TRL.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from losses._dpo import cdpo, masked_token_mean, reward_metrics
from losses._registry import register

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def alphapo_reward(logps, alpha):
  """AlphaPO's reward (1 - p^-alpha) / alpha with p = exp(logps); alpha -> 0 gives logps."""
  return (1.0 - jnp.exp(-alpha * logps)) / alpha


def log1mexp(x):
  """log(1 - e^x) for x < 0, switching form at -log 2 to avoid cancellation (Maechler 2012)."""
  return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def chosen_nll(policy):
  return masked_token_mean(-policy["token_logps"][:, 0], policy["mask"][:, 0])


def cpo(policy, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0,
        simpo_gamma=0.5, alpha=0.0):
  """CPO / SimPO / AlphaPO from the policy outputs alone; returns (loss, metrics)."""
  if loss_type not in CPO_LOSS_TYPES:
    raise ValueError(f"unknown CPO loss_type {loss_type!r}; valid: {CPO_LOSS_TYPES}")
  if loss_type == "alphapo":
    loss_type, cpo_alpha = "simpo", 0.0
  lp = policy["logps"]
  if loss_type in ("ipo", "simpo"):
    lp = lp / jnp.maximum(policy["lengths"], 1.0)
  r = alphapo_reward(lp, alpha) if alpha != 0.0 else lp
  u = r[:, 0] - r[:, 1]
  if loss_type == "simpo":
    u = u - simpo_gamma / beta
  if loss_type in ("sigmoid", "simpo"):
    per_example = cdpo(beta * u, label_smoothing)
  elif loss_type == "hinge":
    per_example = jax.nn.relu(1.0 - beta * u)
  else:  # ipo
    per_example = (u - 1.0 / (2.0 * beta)) ** 2
  nll = chosen_nll(policy) if cpo_alpha != 0.0 else jnp.zeros((), u.dtype)
  loss = per_example.mean() + cpo_alpha * nll
  metrics = reward_metrics(beta * r[:, 0], beta * r[:, 1], lp[:, 0], lp[:, 1])
  metrics["nll_loss"] = jax.lax.stop_gradient(nll)
  return loss, metrics


@register("cpo", kind="pairwise")
def cpo_loss(policy: Mapping[str, jax.Array], reference, batch: Mapping[str, Any], cfg):
  """CPO; `cfg`: loss_type (sigmoid|hinge|ipo|simpo|alphapo), beta, label_smoothing, cpo_alpha,
  simpo_gamma, alpha (AlphaPO)."""
  del reference, batch
  return cpo(policy, loss_type=cfg.get("loss_type", "sigmoid"), beta=cfg.get("beta", 0.1),
             label_smoothing=cfg.get("label_smoothing", 0.0), cpo_alpha=cfg.get("cpo_alpha", 1.0),
             simpo_gamma=cfg.get("simpo_gamma", 0.5), alpha=cfg.get("alpha", 0.0))


@register("simpo", kind="pairwise")
def simpo_loss(policy: Mapping[str, jax.Array], reference, batch: Mapping[str, Any], cfg):
  """SimPO with the paper's defaults; `cfg`: beta, simpo_gamma, label_smoothing, cpo_alpha, alpha."""
  del reference, batch
  return cpo(policy, loss_type="simpo", beta=cfg.get("beta", 2.0),
             label_smoothing=cfg.get("label_smoothing", 0.0), cpo_alpha=cfg.get("cpo_alpha", 0.0),
             simpo_gamma=cfg.get("simpo_gamma", 1.0), alpha=cfg.get("alpha", 0.0))


@register("orpo", kind="pairwise")
def orpo_loss(policy: Mapping[str, jax.Array], reference, batch: Mapping[str, Any], cfg):
  """ORPO; `cfg`: beta (lambda, 0.1)."""
  del reference, batch
  beta = cfg.get("beta", 0.1)
  avg = jnp.minimum(policy["logps"] / jnp.maximum(policy["lengths"], 1.0), -1e-7)
  log_odds = (avg[:, 0] - avg[:, 1]) - (log1mexp(avg[:, 0]) - log1mexp(avg[:, 1]))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll = chosen_nll(policy)
  loss = nll - beta * ratio.mean()
  metrics = reward_metrics(beta * avg[:, 0], beta * avg[:, 1], avg[:, 0], avg[:, 1])
  metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
