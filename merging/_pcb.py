"""PCB-Merging: parameter competition balancing, with the official element-wise normalisation.

Over the task vectors of the whole model, flattened to tau [N, D] (or per tensor, `per_tensor=True`):
    q_lo, q_hi = sort(|tau_i|)[floor(D clip)], sort(|tau_i|)[floor(D (1 - clip)) - 1]     (per model)
    a_i = clip(|tau_i|, q_lo, q_hi);  tau_i' = sign(tau_i) a_i                (what gets merged)
    intra_i = exp(N Norm(a_i)^2)                Norm: per-model min-max over all D positions
    inter_i = tanh(tau_i * sum_j tau_j)         (the unclipped tau)
    s_i = intra_i inter_i;  b_i = Norm(max(s_i, sort(s_i)[floor(D (1 - density))]))   (soft top-density)
    theta = theta_0 + lambda sum_i b_i tau_i' / max(sum_i b_i, 1e-12)        (element-wise)

(Du et al., 2024, "Parameter Competition Balancing for Model Merging", arXiv:2410.02396; the official
`PCB_merge` of `duguodong7/pcb-merging`, pcb_ratio = density, default 0.1; lambda fixed here, the paper
also searches it.) mergekit's `pcb` (absent from 0.1.5) divides by a global scalar sum of the weights
instead, which shrinks the merged delta; we follow the official code. Whole-model statistics: the
streaming `merge_checkpoints` loads every tensor for this method. `per_tensor=True` applies the formula
to each leaf on its own (a stacked [L, ...] leaf as a whole); it is not the paper's method.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from merging._registry import register_merge
from merging._sparsify import kth_smallest_rows


def _minmax(x):
  """Per-row min-max rescale; a constant row gives 0 (the reference divides 0 by 0 there)."""
  lo, hi = jnp.min(x, axis=1, keepdims=True), jnp.max(x, axis=1, keepdims=True)
  return jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


def _row_quantile(x, index):
  return kth_smallest_rows(x, index)[:, None]


@functools.partial(jax.jit, static_argnames=("density", "clip"))
def pcb_merge_flat(tau: jnp.ndarray, density: float = 0.1, clip: float = 1e-4) -> jnp.ndarray:
  """The merged task vector [D] from tau [N, D] (module docstring)."""
  n, d = tau.shape
  a = jnp.abs(tau)
  a = jnp.clip(a, _row_quantile(a, int(d * clip)), _row_quantile(a, int(d * (1 - clip)) - 1))
  clipped = jnp.sign(tau) * a
  intra = jnp.exp(n * jnp.square(_minmax(a)))
  inter = jnp.tanh(tau * jnp.sum(tau, axis=0, keepdims=True))
  s = intra * inter
  s = jnp.maximum(s, _row_quantile(s, int(d * (1 - density))))
  b = _minmax(s)
  return jnp.sum(clipped * b, axis=0) / jnp.maximum(jnp.sum(b, axis=0), 1e-12)


@register_merge("pcb", kind="model", per_model=())
def pcb(base, models, *, density: float = 0.1, lambda_: float = 1.0, clip: float = 1e-4,
        per_tensor: bool = False, seed=0):
  """PCB-Merging over whole flattened models (module docstring)."""
  del seed
  paths = list(base)
  groups = [[p] for p in paths] if per_tensor else [paths]
  out = {}
  for group in groups:
    tau = jnp.stack([jnp.concatenate([(m[p] - base[p]).reshape(-1) for p in group]) for m in models])
    merged = pcb_merge_flat(tau, density, clip)
    off = 0
    for p in group:
      size = base[p].size
      out[p] = base[p] + lambda_ * merged[off:off + size].reshape(base[p].shape)
      off += size
  return out
