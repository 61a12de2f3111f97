r"""DPO-Kernels: DPO with an embedding-kernel term and a choice of divergence regulariser.

Paper: Das et al. 2025, "DPO Kernels: A Semantically-Aware, Kernel-Enhanced, and Divergence-Rich Paradigm
for Direct Preference Optimization" (arXiv 2501.03271, ACL Findings 2025). Reference code:
anonymous-panda123/DPO-Kernels (`DPO_Kernels.py`, `Hierarchical_Mixture_of_Kernels.py`).

    kernel_ratio = log K(e_x, e_c) - log K(e_x, e_r)          (losses/_kernels.py)
    D            = D(pi(.|x, y_c) || pi_ref(.|x, y_c)) at the last chosen token   (losses/_divergences.py)

Two modes (`cfg.mode`); say which one ran when reporting results:
  faithful        the reference code's formula: no beta, no log-sigmoid, no reference in the first term,
                    loss = mean(-kappa (logpi(y_c) - logpi(y_r) + kernel_ratio) + divergence_scale * D)
                  kappa = kernel_scale = 1.0. It is linear in the log-probs and unbounded below: training can
                  diverge by pushing logpi(y_r) to -inf.
  dpo_compatible  (default) our proposal, not the paper's:
                    loss = mean(-log sig(beta [(rho_c - rho_r) + gamma kernel_ratio]) + divergence_scale * D)
                  With gamma = 0 and divergence_scale = 0 it is exactly DPO's sigmoid loss.

Embeddings (`cfg.embedding_source`):
  policy_hidden     (default) e_c, e_r = `policy["embeddings"]` (mean of the policy's final hidden states over
                    the completion), e_x = `policy["prompt_embeddings"][:, 0]` (over the prompt). The kernel
                    term then has a gradient and shapes the policy.
  reference_hidden  the same from the reference model: a frozen encoder for free, like the reference code's
                    frozen BERT, so only the HMK parameters get the kernel term's gradient.
  batch             precomputed frozen-encoder embeddings `batch["encoder_embeddings"] [B, 2, D]` and
                    `batch["encoder_prompt_embeddings"] [B, D]` (the reference code's CLS vectors).

Kernels (`cfg.kernel`): polynomial (poly_c = 1, poly_degree = 2), rbf (rbf_sigma = 1), spectral
(spectral_lambdas = (1,), spectral_alphas = (1,)), mahalanobis (factor L from
`batch["hmk_params"]["maha_chol"]` if given, else I; maha_eps = 1e-6), or hmk. The HMK parameters are
trainable: the loss declares them at registration (`LossParams("hmk_params", ...)`), so the trainer keeps
`init_hmk_params(dim)` in its trainable tree and passes them to the loss as `batch["hmk_params"]` inside the
differentiated function, where they receive gradients with the policy.
`hmk_entropy_coef` (default 0) subtracts coef * entropy of the mixture weights (form unverified).

Divergences (`cfg.divergence`): kl, js, hellinger, renyi (renyi_a = 1.01), bhattacharyya, wasserstein
(top-k Sinkhorn, wasserstein_k = 32, token embeddings for the ground cost from
`batch["token_embeddings"] [V, D]` if given), f (cfg.f_generator: a name in F_GENERATORS or a callable).
The divergence is taken from `last_logits` ([B, K, V]) in float32, at the chosen completion's last token,
as the reference code does (one position keeps the cost at B x V).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from losses import _divergences as div
from losses import _kernels as ker
from losses._dpo import reward_metrics
from losses._registry import LossParams, register

MODES = ("faithful", "dpo_compatible")
EMBEDDING_SOURCES = ("policy_hidden", "reference_hidden", "batch")

F_GENERATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "kl": lambda t: t * jnp.log(t),
    "reverse_kl": lambda t: -jnp.log(t),
    "pearson": lambda t: jnp.square(t - 1.0),
    "total_variation": lambda t: 0.5 * jnp.abs(t - 1.0),
    "squared_hellinger": lambda t: jnp.square(jnp.sqrt(t) - 1.0),
}


def _embeddings(source, policy, reference, batch):
  if source == "policy_hidden":
    return policy["prompt_embeddings"][:, 0], policy["embeddings"][:, 0], policy["embeddings"][:, 1]
  if source == "reference_hidden":
    e_x, e_c, e_r = (reference["prompt_embeddings"][:, 0], reference["embeddings"][:, 0],
                     reference["embeddings"][:, 1])
  elif source == "batch":
    e_x, e_c, e_r = (batch["encoder_prompt_embeddings"], batch["encoder_embeddings"][:, 0],
                     batch["encoder_embeddings"][:, 1])
  else:
    raise ValueError(f"unknown embedding_source {source!r}; valid: {EMBEDDING_SOURCES}")
  return tuple(jax.lax.stop_gradient(e) for e in (e_x, e_c, e_r))


def kernel_term(cfg, e_x, e_c, e_r, batch):
  """(kernel_ratio [B], HMK params or None) for `cfg.kernel`."""
  kind = cfg.get("kernel", "rbf")
  hmk_params = batch.get("hmk_params", None)
  if kind == "hmk":
    if hmk_params is None:
      raise ValueError("kernel='hmk' needs batch['hmk_params'] (see losses.init_hmk_params)")
    return ker.kernel_log_ratio("hmk", e_x, e_c, e_r, params=hmk_params,
                                degree=cfg.get("poly_degree", 2),
                                maha_eps=cfg.get("maha_eps", 1e-6)), hmk_params
  params = {
      "polynomial": lambda: {"c": cfg.get("poly_c", 1.0), "degree": cfg.get("poly_degree", 2)},
      "rbf": lambda: {"sigma": cfg.get("rbf_sigma", 1.0)},
      "spectral": lambda: {"lambdas": tuple(cfg.get("spectral_lambdas", (1.0,))),
                           "alphas": tuple(cfg.get("spectral_alphas", (1.0,)))},
      "mahalanobis": lambda: {"chol": None if hmk_params is None else hmk_params["maha_chol"],
                              "eps": cfg.get("maha_eps", 1e-6)},
  }
  if kind not in params:
    raise ValueError(f"unknown kernel {kind!r}; valid: {ker.KERNELS + ('hmk',)}")
  return ker.kernel_log_ratio(kind, e_x, e_c, e_r, **params[kind]()), None


def _log_softmax32(logits):
  """log_softmax in float32 at least (bf16 logits would lose the small probabilities)."""
  return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def divergence_term(cfg, policy, reference, batch):
  """D(pi || pi_ref) [B] at the last chosen token."""
  logp = _log_softmax32(policy["last_logits"][:, 0])
  logq = jax.lax.stop_gradient(_log_softmax32(reference["last_logits"][:, 0]))
  name = cfg.get("divergence", "kl")
  f = cfg.get("f_generator", "pearson")
  f = F_GENERATORS[f] if isinstance(f, str) else f
  extra = {}
  if name == "wasserstein":
    extra = {"k": cfg.get("wasserstein_k", 32), "token_embeddings": batch.get("token_embeddings", None)}
  return div.divergence(name, logp, logq, renyi_a=cfg.get("renyi_a", 1.01), f=f, **extra)


def _init_loss_params(cfg, hidden_size: int, rng):
  """HMK trains its kernel-mixture parameters; the other kernels train none."""
  return ker.init_hmk_params(hidden_size, rng) if cfg.get("kernel") == "hmk" else None


@register("dpo_kernels", needs=("reference", "embeddings", "last_logits"), kind="pairwise",
          params=LossParams("hmk_params", _init_loss_params))
def dpo_kernels_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array],
                     batch: Mapping[str, Any], cfg):
  """DPO-Kernels; see the module docstring for `cfg`."""
  mode = cfg.get("mode", "dpo_compatible")
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid: {MODES}")
  beta = cfg.get("beta", 0.1)
  weight = cfg.get("kernel_scale", 1.0) if mode == "faithful" else cfg.get("gamma", 1.0)
  div_scale = cfg.get("divergence_scale", 1.0)
  logps = policy["logps"]
  rho = logps - jax.lax.stop_gradient(reference["logps"])
  zeros = jnp.zeros_like(rho[:, 0])

  hmk_params = None
  if weight != 0.0:
    e = _embeddings(cfg.get("embedding_source", "policy_hidden"), policy, reference, batch)
    k_ratio, hmk_params = kernel_term(cfg, *e, batch)
  else:
    k_ratio = zeros
  d = divergence_term(cfg, policy, reference, batch) if div_scale != 0.0 else zeros

  if mode == "faithful":
    per_example = -weight * ((logps[:, 0] - logps[:, 1]) + k_ratio) + div_scale * d
  else:
    per_example = -jax.nn.log_sigmoid(beta * ((rho[:, 0] - rho[:, 1]) + weight * k_ratio)) + div_scale * d
  loss = per_example.mean()

  metrics = reward_metrics(beta * rho[:, 0], beta * rho[:, 1], logps[:, 0], logps[:, 1])
  metrics.update({"kernel/log_ratio": jax.lax.stop_gradient(k_ratio.mean()),
                  "divergence": jax.lax.stop_gradient(d.mean())})
  if hmk_params is not None:
    entropy = ker.hmk_entropy(hmk_params)
    loss = loss - cfg.get("hmk_entropy_coef", 0.0) * entropy
    metrics.update({f"hmk/{k}": jax.lax.stop_gradient(v)
                    for k, v in ker.hmk_weights(hmk_params).items()})
    metrics["hmk/entropy"] = jax.lax.stop_gradient(entropy)
  return loss, metrics


def select_kernel_divergence(score_fn: Callable[[str, str], float],
                             kernels: Iterable[str] = ker.KERNELS,
                             divergences: Iterable[str] = div.DIVERGENCES,
                             higher_is_better: bool = True):
  """The data-driven selection sweep over (kernel, divergence) pairs.

  `score_fn(kernel, divergence)` returns a validation score (e.g. preference accuracy or reward margin on
  held-out pairs after a short run). Returns `(table, best)`: `table` is a list of
  `(kernel, divergence, score)` rows sorted best first, `best` the winning `(kernel, divergence)`. The
  paper's named selection metrics are unverified, so the selector scores pairs by what the caller measures.
  """
  table = [(k, d, float(score_fn(k, d))) for k in kernels for d in divergences]
  if not table:
    raise ValueError("select_kernel_divergence needs at least one kernel and one divergence")
  table.sort(key=lambda row: -row[2] if higher_is_better else row[2])
  return table, table[0][:2]


def format_selection_table(table) -> str:
  """The sweep as aligned text, best first."""
  lines = [f"{'kernel':<12} {'divergence':<14} {'score':>10}"]
  lines += [f"{k:<12} {d:<14} {s:>10.4f}" for k, d, s in table]
  return "\n".join(lines)
