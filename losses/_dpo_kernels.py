r"""DPO-Kernels: DPO with an embedding-kernel term and a choice of divergence regulariser.

Paper: Das et al. 2025, "DPO Kernels: A Semantically-Aware, Kernel-Enhanced, and Divergence-Rich Paradigm
for Direct Preference Optimization" (arXiv 2501.03271, ACL Findings 2025). Reference code:
anonymous-panda123/DPO-Kernels (`DPO_Kernels.py`, `Hierarchical_Mixture_of_Kernels.py`).

    kernel_ratio = log K(e_x, e_c) - log K(e_x, e_r)          (losses/_kernels.py)
    D            = D(pi(.|x, y_c) || pi_ref(.|x, y_c)) at the last chosen token   (losses/_divergences.py)

Two modes (`cfg.mode`); say which one ran when reporting results:
  faithful        the reference code's objective (`CustomDPOTrainer._compute_loss`): no beta, no log-sigmoid,
                  the policy's log-ratio without the reference, the reference model only inside D:
                    loss = mean(-kappa (logpi(y_c) - logpi(y_r) + kernel_ratio) + divergence_scale * D)
                  kappa = kernel_scale = 1.0. It is linear in the log-probs and unbounded below: training can
                  diverge by pushing logpi(y_r) to -inf.
  dpo_compatible  (default) OURS, not the paper's: the kernel ratio inside DPO's log-sigmoid,
                    loss = mean(-log sig(beta [(rho_c - rho_r) + gamma kernel_ratio]) + divergence_scale * D)
                  rho = logpi - logpi_ref. With gamma = 0 and divergence_scale = 0 it is exactly DPO's sigmoid.

Embeddings (`cfg.embedding_source`), pooled by `cfg.embedding_pool`:
  policy_hidden     (default) the policy's final hidden states, so the kernel term has a gradient and shapes
                    the policy (ours: the paper embeds with a frozen encoder).
  reference_hidden  the same from the reference model (frozen, no gradient to the policy).
  frozen_encoder    the paper's source: a frozen checkpoint (`cfg.encoder_path`, an HF directory the
                    project's loader reads) run by the trainer on the batch's tokens, its outputs in
                    `batch["encoder_outputs"]` (the registration's `FrozenModel`). No gradient reaches it.
  batch             embeddings precomputed into the data: `batch["e_x"]` [B, D], `batch["e_c"]`,
                    `batch["e_r"]` [B, D] (e.g. a BERT's CLS vectors, as the reference code uses).
  embedding_pool: mean  (default) e_x = mean over the prompt's input positions (bos + prompt, nothing of
                        the response), e_y = mean over the response's loss positions;
                  last  e_x = the state at the last prompt token, e_y = the state at the eos input, which
                        has seen prompt and response (a causal model's sequence embedding; the reference
                        code embeds prompt + response and takes its first, CLS, position, which a causal
                        decoder cannot offer: its first position sees bos only).

Kernels (`cfg.kernel`): polynomial (poly_c = 1, poly_degree = 2), rbf (rbf_sigma = 1), spectral
(spectral_lambdas = (1,), spectral_alphas = (1,)), mahalanobis, or hmk. Mahalanobis's Sigma^-1
(`cfg.maha_sigma_inv`): "identity" (then it equals RBF with sigma = 1), a path to a `.npy` [D, D] file
(e.g. `losses.mahalanobis_precision_from_embeddings` of the data's embeddings, saved), or "learned": a
trained Cholesky factor L (S = L L^T + maha_eps I, PSD by construction) initialised to I. The trained
parameters (HMK's, or the learned L) are declared at registration (`LossParams("hmk_params", ...)`): the
trainer keeps them in its trainable tree and passes them as `batch["hmk_params"]` inside the
differentiated function. `hmk_entropy_coef` (default 0) subtracts coef * entropy of the mixture weights
(form unverified).

Divergences (`cfg.divergence`): kl, js, hellinger, renyi (renyi_a = 1.01), bhattacharyya, wasserstein,
f (cfg.f_generator: a name in F_GENERATORS or a callable). The divergence is taken from `last_logits`
([B, K, V]) in float32 at the chosen completion's last loss position, as the reference code does (one
position keeps the cost at B x V); it needs the reference model's logits, so precomputed reference log-probs
(`ref_logps` in the batch) allow only `divergence_scale = 0`. Wasserstein: entropic OT (Sinkhorn,
`wasserstein_epsilon` relative to the largest cost, `wasserstein_iters`) on the top-`wasserstein_k`
support, with the ground cost `wasserstein_cost`: "embedding" (default) the Euclidean distance between the
support tokens' rows of the model's input embedding table (the declared output "token_embeddings"),
"discrete" the 0/1 metric (W1 is then the total variation on the support). The reference code solves
exact OT with a caller-given V x V cost matrix.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from losses import _divergences as div
from losses import _kernels as ker
from losses._dpo import reward_metrics
from losses._registry import FrozenModel, LossParams, register

MODES = ("faithful", "dpo_compatible")
EMBEDDING_SOURCES = ("policy_hidden", "reference_hidden", "frozen_encoder", "batch")
EMBEDDING_POOLS = ("mean", "last")
WASSERSTEIN_COSTS = ("embedding", "discrete")
ENCODER_KEY = "encoder_outputs"     # batch[ENCODER_KEY]: the frozen encoder's Outputs (the trainer's)

F_GENERATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "kl": lambda t: t * jnp.log(t),
    "reverse_kl": lambda t: -jnp.log(t),
    "pearson": lambda t: jnp.square(t - 1.0),
    "total_variation": lambda t: 0.5 * jnp.abs(t - 1.0),
    "squared_hellinger": lambda t: jnp.square(jnp.sqrt(t) - 1.0),
}


def _pooled(outputs, pool, what):
  """(e_x, e_c, e_r) from a model's Outputs, pooled by `pool`."""
  keys = {"mean": ("prompt_embeddings", "embeddings"), "last": ("prompt_last_embeddings", "last_embeddings")}
  if pool not in keys:
    raise ValueError(f"unknown embedding_pool {pool!r}; valid: {EMBEDDING_POOLS}")
  prompt_key, seq_key = keys[pool]
  if outputs is None or prompt_key not in outputs:
    raise ValueError(f"embedding_source needs the {what}'s hidden states, which this run does not compute "
                     + ("(reference log-probs precomputed into the data carry none: use "
                        "embedding_source='policy_hidden', 'frozen_encoder' or 'batch', or drop "
                        "data.ref_logps_field)" if what == "reference model" else ""))
  return outputs[prompt_key][:, 0], outputs[seq_key][:, 0], outputs[seq_key][:, 1]


def embeddings(cfg, policy, reference, batch):
  """(e_x [B, D], e_c [B, D], e_r [B, D]) from `cfg.embedding_source` (see the module docstring)."""
  source, pool = cfg.get("embedding_source", "policy_hidden"), cfg.get("embedding_pool", "mean")
  if source == "policy_hidden":
    return _pooled(policy, pool, "policy")
  if source == "reference_hidden":
    e = _pooled(reference, pool, "reference model")
  elif source == "frozen_encoder":
    if ENCODER_KEY not in batch:
      raise ValueError(f"embedding_source='frozen_encoder' reads batch[{ENCODER_KEY!r}], which the trainer "
                       f"fills from the checkpoint named by loss.encoder_path (empty here?)")
    e = _pooled(batch[ENCODER_KEY], pool, "frozen encoder")
  elif source == "batch":
    missing = [k for k in ("e_x", "e_c", "e_r") if k not in batch]
    if missing:
      raise ValueError(f"embedding_source='batch' reads precomputed embeddings batch['e_x'], ['e_c'], ['e_r'] "
                       f"[B, D]; missing {missing} (set data.embeddings_field to the record fields holding "
                       f"them, or use embedding_source='frozen_encoder' with loss.encoder_path)")
    e = (batch["e_x"], batch["e_c"], batch["e_r"])
  else:
    raise ValueError(f"unknown embedding_source {source!r}; valid: {EMBEDDING_SOURCES}")
  e = tuple(jnp.asarray(x) for x in e)
  return tuple(jax.lax.stop_gradient(x.astype(jnp.promote_types(x.dtype, jnp.float32))) for x in e)


@functools.lru_cache(maxsize=4)
def _load_precision(path: str) -> np.ndarray:
  s = np.load(path)
  if s.ndim != 2 or s.shape[0] != s.shape[1]:
    raise ValueError(f"maha_sigma_inv file {path!r} must hold a square [D, D] matrix, got shape {s.shape}")
  return s


def mahalanobis_params(cfg, hmk_params, dim: int) -> dict:
  """The keyword arguments of `log_mahalanobis` for `cfg.maha_sigma_inv`."""
  which = cfg.get("maha_sigma_inv", "identity")
  eps = cfg.get("maha_eps", 1e-6)
  if which == "identity":
    return {"chol": None, "eps": eps}
  if which == "learned":
    if hmk_params is None or "maha_chol" not in hmk_params:
      raise ValueError("maha_sigma_inv='learned' needs batch['hmk_params']['maha_chol'] (the trainer passes "
                       "the loss's own parameters; see losses.LossParams)")
    return {"chol": hmk_params["maha_chol"], "eps": eps}
  precision = _load_precision(str(which))
  if precision.shape[0] != dim:
    raise ValueError(f"maha_sigma_inv {which!r} is {precision.shape[0]} x {precision.shape[0]}, the embeddings "
                     f"have dimension {dim}")
  return {"precision": precision}


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
      "mahalanobis": lambda: mahalanobis_params(cfg, hmk_params, e_x.shape[-1]),
  }
  if kind not in params:
    raise ValueError(f"unknown kernel {kind!r}; valid: {ker.KERNELS + ('hmk',)}")
  return ker.kernel_log_ratio(kind, e_x, e_c, e_r, **params[kind]()), None


def _log_softmax32(logits):
  """log_softmax in float32 at least (bf16 logits would lose the small probabilities)."""
  return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def divergence_term(cfg, policy, reference, batch):
  """D(pi || pi_ref) [B] at the last chosen token."""
  if reference is None or "last_logits" not in reference:
    raise ValueError("the DPO-Kernels divergence D(pi || pi_ref) needs the reference model's last-token "
                     "logits, and reference log-probs precomputed into the data (data.ref_logps_field) carry "
                     "none: set loss.divergence_scale=0, or drop data.ref_logps_field so that the reference "
                     "model runs")
  logp = _log_softmax32(policy["last_logits"][:, 0])
  logq = jax.lax.stop_gradient(_log_softmax32(reference["last_logits"][:, 0]))
  name = cfg.get("divergence", "kl")
  f = cfg.get("f_generator", "pearson")
  f = F_GENERATORS[f] if isinstance(f, str) else f
  extra = {}
  if name == "wasserstein":
    cost = cfg.get("wasserstein_cost", "embedding")
    if cost not in WASSERSTEIN_COSTS:
      raise ValueError(f"unknown wasserstein_cost {cost!r}; valid: {WASSERSTEIN_COSTS}")
    table = None
    if cost == "embedding":
      table = policy.get("token_embeddings", batch.get("token_embeddings", None))
      if table is None:
        raise ValueError("wasserstein_cost='embedding' needs the input embedding table (the declared output "
                         "'token_embeddings' of losses.model_outputs)")
    extra = {"k": cfg.get("wasserstein_k", 32), "token_embeddings": table,
             "epsilon": cfg.get("wasserstein_epsilon", 0.01), "iters": cfg.get("wasserstein_iters", 200)}
  return div.divergence(name, logp, logq, renyi_a=cfg.get("renyi_a", 1.01), f=f, **extra)


def _init_loss_params(cfg, hidden_size: int, rng):
  """HMK trains its kernel-mixture parameters, a learned Mahalanobis its factor L; the others train none.
  `hidden_size` is the width of the embeddings the kernel reads (the frozen encoder's, when one is used);
  `cfg.embedding_dim` overrides it (precomputed embeddings in the data have a width the trainer cannot see)."""
  hidden_size = int(cfg.get("embedding_dim", 0) or hidden_size)
  if cfg.get("kernel") == "hmk":
    return ker.init_hmk_params(hidden_size, rng)
  if cfg.get("kernel") == "mahalanobis" and cfg.get("maha_sigma_inv", "identity") == "learned":
    return {"maha_chol": jnp.eye(hidden_size, dtype=jnp.float32)}
  return None


def check_config(cfg):
  """Raises a ValueError naming the valid options for a wrong one (the trainer asks before any compile)."""
  for key, default, valid in (("mode", "dpo_compatible", MODES),
                              ("embedding_source", "policy_hidden", EMBEDDING_SOURCES),
                              ("embedding_pool", "mean", EMBEDDING_POOLS),
                              ("wasserstein_cost", "embedding", WASSERSTEIN_COSTS),
                              ("kernel", "rbf", ker.KERNELS + ("hmk",)),
                              ("divergence", "kl", div.DIVERGENCES)):
    if cfg.get(key, default) not in valid:
      raise ValueError(f"loss.{key}={cfg.get(key)!r}; valid: {', '.join(valid)}")
  sigma_inv = cfg.get("maha_sigma_inv", "identity")
  if sigma_inv not in ("identity", "learned") and not str(sigma_inv).endswith(".npy"):
    raise ValueError(f"loss.maha_sigma_inv={sigma_inv!r}; valid: identity, learned, or a path to a .npy file")


def _needs(cfg):
  """The outputs this configuration reads beyond ("reference", "last_logits"); checks the options first."""
  check_config(cfg)
  needs = set()
  weight = cfg.get("kernel_scale", 1.0) if cfg.get("mode", "dpo_compatible") == "faithful" else cfg.get("gamma", 1.0)
  if weight != 0.0 and cfg.get("embedding_source", "policy_hidden") in ("policy_hidden", "reference_hidden"):
    needs.add("last_hidden" if cfg.get("embedding_pool", "mean") == "last" else "embeddings")
  if (cfg.get("divergence_scale", 1.0) != 0.0 and cfg.get("divergence", "kl") == "wasserstein"
      and cfg.get("wasserstein_cost", "embedding") == "embedding"):
    needs.add("token_embeddings")
  return needs


def _encoder_path(cfg):
  """The frozen encoder checkpoint the trainer runs for embedding_source='frozen_encoder', else None."""
  if cfg.get("embedding_source", "policy_hidden") != "frozen_encoder":
    return None
  path = cfg.get("encoder_path", "")
  if not path:
    raise ValueError("embedding_source='frozen_encoder' needs loss.encoder_path: a Hugging Face checkpoint "
                     "directory the project's loader reads (models.load_hf), used frozen as the embedder")
  return path


def _encoder_needs(cfg):
  return {"last_hidden" if cfg.get("embedding_pool", "mean") == "last" else "embeddings"}


@register("dpo_kernels", needs=("reference", "last_logits"), kind="pairwise", needs_fn=_needs,
          params=LossParams("hmk_params", _init_loss_params),
          frozen_model=FrozenModel(ENCODER_KEY, _encoder_path, _encoder_needs))
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
  rho = logps - jax.lax.stop_gradient(reference["logps"])    # metrics (and dpo_compatible's loss)
  zeros = jnp.zeros_like(rho[:, 0])

  hmk_params = None
  if weight != 0.0:
    k_ratio, hmk_params = kernel_term(cfg, *embeddings(cfg, policy, reference, batch), batch)
  else:
    k_ratio = zeros
  d = divergence_term(cfg, policy, reference, batch) if div_scale != 0.0 else zeros

  if mode == "faithful":     # the reference code: -kappa (policy log-ratio + kernel log-ratio) + alpha D
    per_example = -weight * ((logps[:, 0] - logps[:, 1]) + k_ratio) + div_scale * d
  else:                      # ours
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
