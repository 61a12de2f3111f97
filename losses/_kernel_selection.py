r"""DPO-Kernels' data-driven choice of (kernel, divergence), computed before any training.

Paper: Das et al. 2025, "DPO Kernels" (arXiv 2501.03271), contribution (iii) "Data-Driven Selection":
"choosing the optimal kernel-divergence pair among 28 combinations (4 kernels x 7 divergences) ... we
introduce automatic metrics that analyze the data to select the best pair". What we could read (the
abstract, the ACL Findings 2025 entry, public summaries of the paper, and the reference code
anonymous-panda123/DPO-Kernels, whose two files hold the loss and the HMK but no selection code): the
metrics are computed from the preference data and embeddings, one of them is named "Positive-Negative
Divergence", and they pick one kernel and one divergence. What we could NOT find: any metric's formula,
which embeddings they read, how the metrics are combined, or the rule that turns them into a pair.
Everything below is therefore OUR READING, labelled as such; the sweep of short training runs
(`configs/dpo_kernels.py:select_by=sweep`) stays the second selector.

Inputs (per preference pair i = 1..n; all from the model before training, via `losses.model_outputs`):
  x_i            prompt embedding   (`prompt_embeddings[:, 0]`)
  c_i, r_i       chosen / rejected completion embeddings (`embeddings[:, 0]`, `embeddings[:, 1]`)
  p_i, q_i       next-token distributions at the last chosen / rejected completion token
                 (softmax of `last_logits[:, 0]` / `last_logits[:, 1]`), the position the loss's
                 divergence term reads
Each kernel log K is `losses._kernels.log_kernel` with the loss config's parameters (rbf_sigma, poly_c,
poly_degree, spectral_*, maha_eps; Mahalanobis with the factor given as `maha_chol`, else the identity);
each divergence D is `losses._divergences.divergence` with the loss config's parameters.

**Kernel separability KS_k (our reading).** Chosen and rejected completions, each paired with its
prompt, are two samples {(x_i, c_i)} and {(x_i, r_i)}; KS_k is the test-power ratio of the kernel
two-sample statistic (unbiased MMD^2 over its standard deviation, the kernel-choice criterion of
Gretton et al. 2012 and Sutherland et al. 2017; here with the leading term of the U-statistic's variance)
under the product kernel kappa((x, a), (x', b)) = K(x, x') K(a, b):

    h_ij   = kappa_ij(c, c) + kappa_ij(r, r) - kappa_ij(c, r) - kappa_ij(r, c),   kappa_ij(a, b) = K(x_i, x_j) K(a_i, b_j)
    MMD2_u = 1/(n(n-1)) sum_{i != j} h_ij
    H_i    = 1/(n-1) sum_{j != i} h_ij,      var = (4/n) * 1/n sum_i (H_i - MMD2_u)^2
    KS_k   = MMD2_u / sqrt(var)              (0 where var = 0)

KS is invariant to K -> a K (every kappa is divided by the largest off-diagonal one before use, which
changes nothing in exact arithmetic and keeps narrow kernels from underflowing), so kernels with
different scales compare. Reported beside it, not used by the rule: the kernel log-ratio margin the loss
adds, m_i = log K(x_i, c_i) - log K(x_i, r_i), as its mean, the fraction of pairs with m_i > 0, and
SNR_k = mean(m) / std(m) (population std; 0 where std = 0).

**Positive-Negative Divergence PND_D (our reading of the paper's name).** How far the divergence puts
the chosen from the rejected continuation of the same prompt, relative to how far it puts the chosen
continuations of two different prompts (i and i+1 mod n, a fixed cyclic pairing), so that divergences
of different scales compare (PND is invariant to D -> a D):

    PND_D = mean_i D(p_i || q_i) / mean_i D(p_i || p_{i+1 mod n})      (0 where the denominator is 0)

**Rule (our reading).** The kernel statistics do not depend on the divergence nor the divergence
statistics on the kernel, so each axis is chosen on its own: kernel* = argmax_k KS_k, divergence* =
argmax_D PND_D (ties: the first in the candidate order). The 28-row table ranks pairs by the sum of
their two per-axis ranks (ties by the kernel's rank), so (kernel*, divergence*) is its unique first row.
Validation of the rule against the sweep: benchmarks/kernel_selection.py (benchmarks/results/
kernel_selection.md: on three built-in tasks, one seed each, the pick ranked 27, 1 and 24 of 28, chance
level), so the sweep stays the selector to trust.
The `preselect` task passes no Mahalanobis factor (identity) and no token embeddings (the Wasserstein
ground cost is then the 0/1 metric); `selection_statistics` takes both as arguments.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from losses import _divergences as div
from losses import _kernels as ker
from losses._dpo_kernels import F_GENERATORS
from losses._selection import register_selection

# `needs` of `losses.model_outputs` that the statistics read (one forward pass, no reference model).
SELECTION_NEEDS = frozenset({"embeddings", "last_logits"})


def kernel_params(kind: str, cfg: Mapping[str, Any], maha_chol=None) -> dict:
  """The keyword parameters of `_kernels.log_kernel(kind, ...)` from a loss config (its defaults)."""
  if kind == "polynomial":
    return {"c": cfg.get("poly_c", 1.0), "degree": cfg.get("poly_degree", 2)}
  if kind == "rbf":
    return {"sigma": cfg.get("rbf_sigma", 1.0)}
  if kind == "spectral":
    return {"lambdas": tuple(cfg.get("spectral_lambdas", (1.0,))),
            "alphas": tuple(cfg.get("spectral_alphas", (1.0,)))}
  if kind == "mahalanobis":
    return {"chol": maha_chol, "eps": cfg.get("maha_eps", 1e-6)}
  raise ValueError(f"unknown kernel {kind!r}; valid: {ker.KERNELS}")


def _gram(kind, a, b, params):
  """log K(a_i, b_j) [n, m] by broadcasting the kernel over the last axis."""
  return ker.log_kernel(kind, a[:, None, :], b[None, :, :], **params)


# ---------------------------------------------------------------------------------------------------
# Kernel axis.
# ---------------------------------------------------------------------------------------------------
def kernel_separability(kind: str, e_x, e_c, e_r, **params) -> jax.Array:
  """KS_k: MMD2_u / its standard deviation under kappa((x, a), (x', b)) = K(x, x') K(a, b) (docstring)."""
  n = e_x.shape[0]
  if n < 3:
    raise ValueError(f"kernel_separability needs at least 3 pairs, got {n}")
  lx = _gram(kind, e_x, e_x, params)
  logs = {ab: lx + _gram(kind, a, b, params)
          for ab, (a, b) in {"cc": (e_c, e_c), "rr": (e_r, e_r), "cr": (e_c, e_r), "rc": (e_r, e_c)}.items()}
  off = ~jnp.eye(n, dtype=bool)
  # Dividing every kappa by the largest off-diagonal one is exact for a ratio and avoids underflow.
  top = jnp.max(jnp.stack([jnp.max(jnp.where(off, v, -jnp.inf)) for v in logs.values()]))
  k = {ab: jnp.exp(v - top) for ab, v in logs.items()}
  h = jnp.where(off, k["cc"] + k["rr"] - k["cr"] - k["rc"], 0.0)
  mmd2 = h.sum() / (n * (n - 1))
  h_i = h.sum(1) / (n - 1)
  var = 4.0 / n * jnp.mean(jnp.square(h_i - mmd2))
  return jnp.where(var > 0, mmd2 / jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)


def kernel_margin_stats(kind: str, e_x, e_c, e_r, **params) -> dict:
  """Mean, fraction > 0 and SNR of the loss's kernel log-ratio m_i (reported, not used by the rule)."""
  m = ker.kernel_log_ratio(kind, e_x, e_c, e_r, **params)
  mean, std = m.mean(), m.std()
  return {"margin_mean": mean, "margin_pos_frac": jnp.mean(m > 0),
          "margin_snr": jnp.where(std > 0, mean / jnp.where(std > 0, std, 1.0), 0.0)}


# ---------------------------------------------------------------------------------------------------
# Divergence axis.
# ---------------------------------------------------------------------------------------------------
def divergence_kwargs(name: str, cfg: Mapping[str, Any], token_embeddings=None) -> dict:
  """The keyword arguments of `_divergences.divergence(name, ...)` from a loss config (its defaults)."""
  if name == "f":
    f = cfg.get("f_generator", "pearson")
    return {"f": F_GENERATORS[f] if isinstance(f, str) else f}
  if name == "renyi":
    return {"renyi_a": cfg.get("renyi_a", 1.01)}
  if name == "wasserstein":
    return {"k": cfg.get("wasserstein_k", 32), "token_embeddings": token_embeddings}
  return {}


def positive_negative_divergence(name: str, logits_c, logits_r, **kwargs) -> jax.Array:
  """PND_D = mean_i D(p_i || q_i) / mean_i D(p_i || p_{i+1 mod n}) (docstring)."""
  logp = jax.nn.log_softmax(logits_c, axis=-1)
  logq = jax.nn.log_softmax(logits_r, axis=-1)
  positive_negative = div.divergence(name, logp, logq, **kwargs).mean()
  baseline = div.divergence(name, logp, jnp.roll(logp, -1, axis=0), **kwargs).mean()
  return jnp.where(baseline > 0, positive_negative / jnp.where(baseline > 0, baseline, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------
# The rule.
# ---------------------------------------------------------------------------------------------------
def _ranks(scores: Sequence[float]) -> list[int]:
  """0 for the largest; ties keep the candidate order."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  ranks = [0] * len(scores)
  for r, i in enumerate(order):
    ranks[i] = r
  return ranks


def select_pair(kernel_scores: Mapping[str, float], divergence_scores: Mapping[str, float]):
  """(table, best): rows (kernel, divergence, kernel rank, divergence rank) sorted by rank sum (ties: the
  kernel's rank), best = (argmax_k KS_k, argmax_D PND_D)."""
  ks, ds = list(kernel_scores), list(divergence_scores)
  if not ks or not ds:
    raise ValueError("select_pair needs at least one kernel and one divergence")
  rk = dict(zip(ks, _ranks([float(kernel_scores[k]) for k in ks])))
  rd = dict(zip(ds, _ranks([float(divergence_scores[d]) for d in ds])))
  table = sorted(((k, d, rk[k], rd[d]) for k in ks for d in ds), key=lambda r: (r[2] + r[3], r[2]))
  return table, table[0][:2]


def selection_statistics(outputs: Mapping[str, Any], cfg: Mapping[str, Any], *,
                         kernels: Sequence[str] = ker.KERNELS,
                         divergences: Sequence[str] = tuple(d for d in div.DIVERGENCES),
                         maha_chol=None, token_embeddings=None) -> dict:
  """Every statistic and the chosen pair from pooled pairwise `model_outputs` ([n, 2, ...] arrays of
  `prompt_embeddings`, `embeddings`, `last_logits`) and the loss config `cfg`. Returns a JSON-able dict:
  {"kernels": {k: {KS, margin stats}}, "divergences": {D: {PND}}, "table": [...], "best": {...}}."""
  e_x = jnp.asarray(outputs["prompt_embeddings"])[:, 0]
  e_c, e_r = jnp.asarray(outputs["embeddings"])[:, 0], jnp.asarray(outputs["embeddings"])[:, 1]
  logits = jnp.asarray(outputs["last_logits"])
  kern = {}
  for k in kernels:
    params = kernel_params(k, cfg, maha_chol)
    kern[k] = {"separability": float(kernel_separability(k, e_x, e_c, e_r, **params)),
               **{n: float(v) for n, v in kernel_margin_stats(k, e_x, e_c, e_r, **params).items()}}
  divs = {d: {"pnd": float(positive_negative_divergence(
      d, logits[:, 0], logits[:, 1], **divergence_kwargs(d, cfg, token_embeddings)))} for d in divergences}
  table, best = select_pair({k: v["separability"] for k, v in kern.items()},
                            {d: v["pnd"] for d, v in divs.items()})
  return {"n_pairs": int(e_x.shape[0]), "kernels": kern, "divergences": divs,
          "table": [list(r) for r in table], "best": {"kernel": best[0], "divergence": best[1]}}


def format_statistics(stats: Mapping[str, Any]) -> str:
  """Markdown: the two per-axis tables and the chosen pair."""
  lines = [f"Data-driven selection (our reading of DPO-Kernels' metrics) over {stats['n_pairs']} pairs; "
           f"chosen: kernel={stats['best']['kernel']}, divergence={stats['best']['divergence']}", "",
           "| kernel | KS (rule) | margin mean | margin > 0 | margin SNR |", "|---|---|---|---|---|"]
  for k, v in sorted(stats["kernels"].items(), key=lambda kv: -kv[1]["separability"]):
    lines.append(f"| {k} | {v['separability']:.4f} | {v['margin_mean']:.4g} | {v['margin_pos_frac']:.3f} "
                 f"| {v['margin_snr']:.4f} |")
  lines += ["", "| divergence | PND (rule) |", "|---|---|"]
  for d, v in sorted(stats["divergences"].items(), key=lambda kv: -kv[1]["pnd"]):
    lines.append(f"| {d} | {v['pnd']:.4f} |")
  return "\n".join(lines) + "\n"


def pool_outputs(chunks: Sequence[Mapping[str, Any]]) -> dict:
  """Concatenates per-batch outputs along the pair axis (host numpy)."""
  keys = ("prompt_embeddings", "embeddings", "last_logits")
  return {k: np.concatenate([np.asarray(c[k]) for c in chunks], axis=0) for k in keys}


register_selection("dpo_kernels", needs=SELECTION_NEEDS, format_fn=format_statistics)(selection_statistics)
