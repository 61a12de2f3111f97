"""ComPEFT: sparsify and ternarise each task vector, then add them up.

Per model, over the whole flattened update tau_i (D entries; global top-k, not per tensor):
    m_i = the top floor(density D) entries of |tau_i|
    alpha_i = c std(tau_i)        (c = replace_factor; std of the untrimmed tau, ddof = 1 as torch.std)
            = mean(|tau_i| over m_i)    for replace_factor = -2 (STC-style; the mean magnitude)
    tau_i' = m_i sign(tau_i) alpha_i,  or m_i tau_i for replace_factor = -1 (prune only)
    theta = theta_base + lambda sum_i w_i tau_i'

(Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification
and Quantization", arXiv:2311.13171; ref `prateeky2806/ComPEFT`, whose top-k keeps one entry more than
floor(density D).) density and replace_factor defaults (0.1, 1.0) are our choice. Whole-model statistics:
the streaming `merge_checkpoints` loads every tensor for this method.
"""
from __future__ import annotations

import jax.numpy as jnp

from merging._registry import register_merge
from merging._sparsify import topk_mask


def compress(tau: jnp.ndarray, density: float = 0.1, replace_factor: float = 1.0) -> jnp.ndarray:
  """The ComPEFT update of one flattened task vector (module docstring)."""
  m = topk_mask(jnp.abs(tau), int(density * tau.size))
  if replace_factor == -1:
    return jnp.where(m, tau, 0.0)
  if replace_factor == -2:
    alpha = jnp.sum(jnp.where(m, jnp.abs(tau), 0.0)) / jnp.maximum(jnp.sum(m), 1)
  else:
    alpha = replace_factor * jnp.std(tau, ddof=1)
  return jnp.where(m, jnp.sign(tau) * alpha, 0.0)


@register_merge("compeft", kind="model", per_model=("weight",))
def compeft(base, models, *, weight=1.0, density: float = 0.1, replace_factor: float = 1.0,
            lambda_: float = 1.0, seed=0):
  """ComPEFT per model, then task arithmetic (module docstring)."""
  del seed
  paths = list(base)
  weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(models)
  out = {p: base[p] for p in paths}
  for m, w in zip(models, weights):
    tau = jnp.concatenate([(m[p] - base[p]).reshape(-1) for p in paths])
    comp = compress(tau, density, replace_factor)
    off = 0
    for p in paths:
      size = base[p].size
      out[p] = out[p] + lambda_ * w * comp[off:off + size].reshape(base[p].shape)
      off += size
  return out
