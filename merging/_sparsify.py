"""Sparsification of task vectors, shared by TIES, DARE, DELLA, breadcrumbs, SCE, ComPEFT, PCB.

Every mask keeps a *fraction* `density` of the entries of one tensor:
  magnitude           the k = max(1, floor(density n)) largest |x| (TIES trim; mergekit `magnitude`)
  random              m ~ Bernoulli(density) (DARE; mergekit `random`)
  magnitude_outliers  drop the floor(gamma n) largest |x| and the smallest, keeping floor(density n);
                      if gamma >= 1 - density only the top (1 - density) are dropped (Model Breadcrumbs)
  della               per row, p = density - eps + 2 eps (rank(|x|) - 1) / (m - 1), m ~ Bernoulli(p)
                      (DELLA MagPrune; rank 1 = smallest; a 1-D tensor is one row)
Kept entries are then rescaled by `rescale`:
  "density" (or True)  x / p, p the keep probability (density; DELLA's per-entry p). The papers' rule.
  "norm"               x * ||x||_1 / ||m x||_1 (skipped if either is < 1e-7): mergekit 0.1.5's
                       `rescaled_masked_tensor(..., RescaleNorm.l1)`, used by its `rescale: true`.
  None (or False)      no rescaling.

Top-k is exact without a sort (a sort of a 45M-entry tensor takes ~25 s on a CPU): a bisection on the
order-preserving uint32 image of the float32 values finds the k-th largest in 32 counting passes, and ties
at the threshold are kept in flat-index order, so exactly k entries survive.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della")
_ALIASES = {"bernoulli": "random", "della_magprune": "della", "rank_magnitude_sampling": "della"}


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (negative floats reversed below the positive ones)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _from_key(k: jax.Array) -> jax.Array:
  i = jnp.where(k >= jnp.uint32(0x80000000), k ^ jnp.uint32(0x80000000), ~k)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def _kth_largest_key_1d(keys: jax.Array, k: jax.Array) -> jax.Array:
  """The largest t with #{keys >= t} >= k, i.e. the k-th largest key (1 <= k <= n), bit by bit."""
  def body(j, t):
    cand = t | (jnp.uint32(1) << (31 - j).astype(jnp.uint32))
    return jnp.where(jnp.sum(keys >= cand, dtype=jnp.int32) >= k, cand, t)
  return jax.lax.fori_loop(0, 32, body, jnp.uint32(0))


_kth_largest_key = jax.jit(_kth_largest_key_1d)
_kth_largest_key_rows = jax.jit(jax.vmap(_kth_largest_key_1d, in_axes=(0, None)))
_BUCKET_MAX = 1 << 20   # smaller inputs are padded to a power of two, so one compiled kernel serves many shapes


def _padded(flat: jax.Array, fill) -> jax.Array:
  n = flat.shape[-1]
  if n >= _BUCKET_MAX:
    return flat
  size = max(1024, 1 << (n - 1).bit_length())
  pad = [(0, 0)] * (flat.ndim - 1) + [(0, size - n)]
  return jnp.pad(flat, pad, constant_values=fill)


@jax.jit
def _topk_mask_flat(score: jax.Array, k: jax.Array) -> jax.Array:
  keys = _order_key(score)
  t = _kth_largest_key_1d(keys, k)
  gt = keys > t
  eq = keys == t
  need = k - jnp.sum(gt, dtype=jnp.int32)
  # Ties at the threshold (common for bfloat16 weights) keep the first `need` in flat order; the cumsum
  # is slow on CPU, so it runs only when the threshold is tied.
  return jax.lax.cond(jnp.sum(eq, dtype=jnp.int32) > need,
                      lambda: gt | (eq & (jnp.cumsum(eq, dtype=jnp.int32) <= need)),
                      lambda: gt | eq)


def _topk_mask(score: jax.Array, k: jax.Array) -> jax.Array:
  """Padding with -inf never enters the top k (k <= n)."""
  flat = score.reshape(-1)
  return _topk_mask_flat(_padded(flat, -jnp.inf), k)[:flat.shape[0]].reshape(score.shape)


def topk_mask(score: jax.Array, k) -> jax.Array:
  """Boolean mask of exactly the k largest entries of `score` (ties in flat-index order); k may be traced."""
  n = int(np.prod(score.shape))
  if not isinstance(k, (int, np.integer)):
    return _topk_mask(jnp.asarray(score, jnp.float32), jnp.clip(k, 0, n).astype(jnp.int32))
  if k >= n:
    return jnp.ones(score.shape, bool)
  if k <= 0:
    return jnp.zeros(score.shape, bool)
  return _topk_mask(jnp.asarray(score, jnp.float32), jnp.int32(k))


def kth_smallest(x: jax.Array, index: int) -> jax.Array:
  """sort(x.ravel())[index] (0-based) without sorting."""
  return kth_smallest_rows(jnp.reshape(x, (1, -1)), index)[0]


def kth_smallest_rows(x: jax.Array, index) -> jax.Array:
  """sort(x, axis=1)[:, index] for x [N, D] without sorting (padding with -inf sits below every entry)."""
  n = x.shape[1]
  keys = _order_key(_padded(jnp.asarray(x, jnp.float32), -jnp.inf))
  return _from_key(_kth_largest_key_rows(keys, jnp.asarray(n - index, jnp.int32)))


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def magnitude_mask(x: jax.Array, density: float) -> jax.Array:
  """Top max(1, floor(density n)) entries by |x| (all for density >= 1, none for density <= 0)."""
  n = int(np.prod(x.shape))
  if density >= 1:
    return jnp.ones(x.shape, bool)
  if density <= 0 or n == 0:
    return jnp.zeros(x.shape, bool)
  return topk_mask(jnp.abs(x), max(1, int(density * n)))


def magnitude_outliers_mask(x: jax.Array, density: float, gamma: float = 0.01) -> jax.Array:
  """Ascending |x| ranks [n_bot, n_bot + floor(density n)), n_bot = max(0, n - floor(density n) - floor(gamma n))."""
  if density >= 1:
    return jnp.ones(x.shape, bool)
  n = int(np.prod(x.shape))
  target, n_top = int(density * n), int(gamma * n)
  n_bot = max(0, n - target - n_top)
  a = jnp.abs(x)
  return topk_mask(a, n - n_bot) & ~topk_mask(a, n - n_bot - target)


def random_mask(key: jax.Array, density: float, shape) -> jax.Array:
  """m ~ Bernoulli(density), i.i.d. per entry."""
  if density >= 1:
    return jnp.ones(shape, bool)
  return jax.random.bernoulli(key, density, shape)


def della_probs(x: jax.Array, density: float, epsilon: float, row_axis: int = -1) -> jax.Array:
  """Keep probabilities of DELLA's MagPrune: density - eps + 2 eps * rank / (m - 1) along each row."""
  if not (0 < density - epsilon and density + epsilon < 1):
    raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 (got {density}, {epsilon})")
  a = jnp.abs(x)
  if a.ndim == 0:
    a = a.reshape(1)
  m = a.shape[row_axis]
  ranks = jnp.argsort(jnp.argsort(a, axis=row_axis, stable=True), axis=row_axis, stable=True)
  norm = ranks.astype(jnp.float32) / max(m - 1, 1)
  return ((density - epsilon) + norm * 2 * epsilon).reshape(x.shape)


def della_mask(key: jax.Array, x: jax.Array, density: float, epsilon: float, row_axis: int = -1):
  """(mask, probs): m ~ Bernoulli(p) with p = `della_probs`."""
  p = della_probs(x, density, epsilon, row_axis)
  return jax.random.uniform(key, x.shape) < p, p


# ---------------------------------------------------------------------------------------------------
# Rescaling and the one entry point
# ---------------------------------------------------------------------------------------------------
def _rescale_rule(rescale):
  if rescale is True:
    return "density"
  if rescale in (None, False, "none"):
    return None
  if rescale not in ("density", "norm"):
    raise ValueError(f"rescale must be 'density', 'norm' or None, got {rescale!r}")
  return rescale


def rescale_masked(x: jax.Array, mask: jax.Array, rescale, p=None, eps: float = 1e-7) -> jax.Array:
  """mask * x, rescaled by 1/p ("density") or to the L1 norm of x ("norm", mergekit), or not (None)."""
  masked = jnp.where(mask, x, 0.0)
  rule = _rescale_rule(rescale)
  if rule is None:
    return masked
  if rule == "density":
    return masked / p
  before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
  ok = (before >= eps) & (after >= eps)
  return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def sparsify(x: jax.Array, density: float, method: str = "magnitude", *, key: Optional[jax.Array] = None,
             rescale=None, gamma: float = 0.01, epsilon: float = 0.15, row_axis: int = -1,
             mask: Optional[jax.Array] = None) -> jax.Array:
  """Keeps a fraction `density` of x by `method` (see the module docstring) and rescales the rest.

  `mask` overrides the sampled mask (the parity tests feed the same mask to mergekit).
  """
  method = _ALIASES.get(method, method)
  if method not in SPARSIFIERS:
    raise ValueError(f"unknown sparsification {method!r}; one of {SPARSIFIERS}")
  if density >= 1:
    return x
  p = density
  if method == "magnitude":
    if density <= 0:
      return jnp.zeros_like(x)
    m = magnitude_mask(x, density) if mask is None else mask
  elif method == "magnitude_outliers":
    m = magnitude_outliers_mask(x, density, gamma) if mask is None else mask
  elif method == "random":
    m = random_mask(key, density, x.shape) if mask is None else mask
  else:
    if density <= 0:
      return jnp.zeros_like(x)
    m, p = della_mask(key, x, density, epsilon, row_axis)
    m = m if mask is None else mask
  return rescale_masked(x, m, rescale, p)
