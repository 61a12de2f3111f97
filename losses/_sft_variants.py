"""SFT variants: DFT, Anchored SFT, Aligned SFT, PoFT and a confidence-limited cross-entropy.

Two papers call their method "ASFT"; neither gets that name here (`get("asft")` raises, naming both):
`anchored_sft` is Anchored SFT (DFT + a KL anchor, Zhu et al. 2025) and `aligned_sft` is Aligned SFT
(absolute-likelihood alignment on preference pairs, Wang et al. 2024).

All but `aligned_sft` (a pairwise loss) are `kind="sft"` losses over K = 1 completion per example (`token_logps`, `mask` [B, 1, T]); p_t is the
policy probability of the target token y_t and "mean over tokens" divides the masked sum by the number of
completion tokens in the batch.

DFT (*On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification*,
Wu et al., arXiv 2508.05629; TRL `sft_trainer.py: dft_loss`):

    L_DFT = mean_t  -sg(p_t) * log p_t            so  dL/dθ = -p_t ∇ log p_t / N

i.e. CE whose per-token gradient is rescaled by the (detached) probability of the token.

Anchored SFT, `anchored_sft` (*Anchored Supervised Fine-Tuning*, Zhu et al., arXiv 2509.23753;
`zhuchichi56/ASFT`, mode asft):

    L_anchored = L_DFT + kl_weight * mean_t KL(π_ref(.|x, y_<t) || π_θ(.|x, y_<t)),   kl_weight = 0.1

with the KL over the full vocabulary. The direction is the one the released code computes (`kl_div(log
π_θ, π_ref)`, forward KL from the reference), which the paper's text calls reverse. The reference is the
base model (adapters stripped, or a frozen copy under full fine-tuning), so the loss needs the reference's
logits: memory [B, T, V] twice.

Aligned SFT, `aligned_sft` (*ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood*, Wang, Sun,
Hua, Fang, arXiv 2409.10571). No reference model; each response of a pair is pushed by its own absolute
likelihood instead of a Bradley–Terry margin:

    L_aligned = NLL(y_w) - lambda * [log σ(r(y_w)) + log σ(-r(y_l))],    r(y) = log(p(y) / (1 - p(y)))

The form is the third-party summary in METHODS.md (UNVERIFIED against the paper's equations). Our reading,
following ORPO (which the paper compares with and whose odds it uses): p(y) = exp(mean token log-prob of y)
(`length_normalize=True`; False uses the summed log-prob), clipped at log p <= -1e-7 so a certain response
keeps finite odds, NLL(y_w) the mean over chosen completion tokens, lambda = `beta` = 0.1 (ORPO's; the
paper's value is unverified).

PoFT (*Preference-Oriented Supervised Fine-Tuning: Favoring Target Model Over Aligned Large Language
Models*, Fan et al., 2024). UNVERIFIED FORM, inferred from the abstract (a Bradley–Terry
preference of the target model over aligned models on the same SFT data):

    L_PoFT = mean_b mean_m  -log σ(β [log π_θ(y|x) - log π_aligned_m(y|x)])

`batch["aligned_logps"]` [B, 1, M] holds the summed completion log-probs of M aligned models, precomputed
once into the records by the `precompute` task (`configs/precompute.py`, once per aligned model with
`append=True`) and read with `data.aligned_logps_field` (and `data.packing="none"`: one example per row).
The mean is over the rows that hold a completion.

Confidence-limited CE (*Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves
Mathematical Reasoning*, Chen et al., arXiv 2502.07154). The paper's exact objective is UNVERIFIED here; two
documented choices are offered through `cfg.form`:

  "cap" (default, our choice): CE on the tokens the model is not yet sure of,
      L = sum_t -log p_t * 1[p_t < max_confidence] / N,
  the indicator is a constant (no gradient flows through the comparison), so a token whose probability
  already exceeds `max_confidence` contributes neither loss nor gradient: training stops pushing
  confident tokens towards 1, which is what hurts pass@N (a collapsed distribution wastes the N samples).
  N counts every completion token, so the capped tokens dilute rather than reweight the rest.

  "pass_at_n": the coverage objective for pass@N on the sequence probability p = exp(log π(y|x)),
      L = mean_b -log(1 - (1 - p)^n),
  whose gradient is the CE gradient times n (1-p)^(n-1) p / (1 - (1-p)^n), which goes to 0 as p -> 1 and
  to 1 as p -> 0 (n = 1 recovers CE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._dpo import reward_metrics
from losses._pairwise_ref_free import chosen_nll, log1mexp
from losses._registry import register, retire
from losses._sft import masked_mean

retire("asft", "two methods share that acronym; use 'anchored_sft' (Anchored SFT: DFT + KL to the "
               "reference, Zhu et al. 2025) or 'aligned_sft' (Aligned SFT: absolute-likelihood odds on "
               "preference pairs, Wang et al. 2024)")


def dft_terms(token_logps, mask):
  """Per-token -sg(p)·log p (masked)."""
  return -jax.lax.stop_gradient(jnp.exp(token_logps)) * token_logps * mask


@register("dft", kind="sft")
def dft_loss(policy, reference, batch, cfg):
  """DFT: mean over completion tokens of -sg(p_t)·log p_t."""
  del reference, batch, cfg
  lp, mask = policy["token_logps"], policy["mask"]
  loss = dft_terms(lp, mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"dft": loss, "nll": masked_mean(-lp, mask), "tokens": mask.sum()}


def token_kl(ref_logits, logits):
  """KL(softmax(ref_logits) || softmax(logits)) over the last (vocabulary) axis, in float32."""
  ref_lp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=-1)


@register("anchored_sft", needs=("reference", "logits"), kind="sft")
def anchored_sft_loss(policy, reference, batch, cfg):
  """Anchored SFT: DFT + kl_weight · mean over completion tokens of KL(π_ref || π_θ) over the vocabulary."""
  del batch
  lp, mask = policy["token_logps"], policy["mask"]
  n = jnp.maximum(mask.sum(), 1.0)
  dft = dft_terms(lp, mask).sum() / n
  kl = (token_kl(jax.lax.stop_gradient(reference["logits"]), policy["logits"]) * mask).sum() / n
  loss = dft + cfg.get("kl_weight", 0.1) * kl
  return loss, {"dft": dft, "kl": kl, "nll": masked_mean(-lp, mask), "tokens": mask.sum()}


def log_odds(logps):
  """log(p / (1 - p)) for p = exp(logps), logps clipped at -1e-7 (finite odds for a certain response)."""
  logps = jnp.minimum(logps, -1e-7)
  return logps - log1mexp(logps)


@register("aligned_sft", kind="pairwise")
def aligned_sft_loss(policy, reference, batch, cfg):
  """Aligned SFT (unverified form, see the module docstring); `cfg`: beta (lambda, 0.1), length_normalize."""
  del reference, batch
  beta = cfg.get("beta", 0.1)
  lp = policy["logps"]
  if cfg.get("length_normalize", True):
    lp = lp / jnp.maximum(policy["lengths"], 1.0)
  r = log_odds(lp)
  align = -(jax.nn.log_sigmoid(r[:, 0]) + jax.nn.log_sigmoid(-r[:, 1]))
  nll = chosen_nll(policy)
  loss = nll + beta * align.mean()
  metrics = reward_metrics(beta * r[:, 0], beta * r[:, 1], lp[:, 0], lp[:, 1])
  metrics.update({"nll_loss": jax.lax.stop_gradient(nll), "align_loss": jax.lax.stop_gradient(align.mean()),
                  "log_odds/chosen": jax.lax.stop_gradient(r[:, 0].mean()),
                  "log_odds/rejected": jax.lax.stop_gradient(r[:, 1].mean())})
  return loss, metrics


@register("poft", kind="sft")
def poft_loss(policy, reference, batch, cfg):
  """PoFT (unverified form): mean over examples and aligned models of -log σ(β(logπ_θ - logπ_aligned))."""
  del reference
  if "aligned_logps" not in batch:
    raise ValueError("loss 'poft' needs batch['aligned_logps'] [B, 1, M]: the aligned models' summed "
                     "completion log-probs, precomputed into the data")
  aligned = batch["aligned_logps"].astype(jnp.float32)          # [B, 1, M]
  margin = cfg.get("beta", 0.1) * (policy["logps"][..., None] - aligned)
  # Rows without a completion (the padding of a last eval batch) count for nothing.
  w = jnp.broadcast_to((policy["lengths"] > 0)[..., None], margin.shape).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: (x * w).sum() / n
  loss = mean(-jax.nn.log_sigmoid(margin))
  return loss, {"poft/margin": mean(margin), "poft/win_rate": mean((margin > 0).astype(jnp.float32)),
                "logps/policy": mean(jnp.broadcast_to(policy["logps"][..., None], margin.shape)),
                "logps/aligned": mean(aligned)}


@register("conf_limited", kind="sft")
def conf_limited_loss(policy, reference, batch, cfg):
  """Confidence-limited CE (our documented choice, see the module docstring): `form` cap | pass_at_n."""
  del reference, batch
  lp, mask = policy["token_logps"], policy["mask"]
  form = cfg.get("form", "cap")
  if form == "cap":
    cap = cfg.get("max_confidence", 0.9)
    active = jax.lax.stop_gradient((jnp.exp(lp) < cap).astype(jnp.float32)) * mask
    loss = (-lp * active).sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, {"nll": masked_mean(-lp, mask), "capped_fraction": 1.0 - active.sum() / jnp.maximum(
        mask.sum(), 1.0), "tokens": mask.sum()}
  if form == "pass_at_n":
    n = cfg.get("n", 8)
    # log(1 - (1-p)^n) = log(-expm1(n log1p(-p))); keep p < 1 so log1p(-p) stays finite.
    seq_lp = jnp.minimum(policy["logps"], -1e-7)
    log_miss = n * jnp.log1p(-jnp.exp(seq_lp))
    loss = -jnp.log(-jnp.expm1(log_miss)).mean()
    return loss, {"nll": masked_mean(-lp, mask), "pass_at_n": (-jnp.expm1(log_miss)).mean(),
                  "tokens": mask.sum()}
  raise ValueError(f"conf_limited: cfg.form={form!r}; valid: cap, pass_at_n")
