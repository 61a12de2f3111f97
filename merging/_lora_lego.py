"""LoRA-LEGO: rank-wise clustering of several LoRAs into one rank-k LoRA.

Each rank-1 part of each adapter is a minimal semantic unit u = [a[:, j]; w s b[j, :]] (column j of a,
row j of b with the adapter's scale and weight folded into b), in R^(in + out). The units of all adapters
are pooled and clustered by k-means (Lloyd, `iters` rounds, deterministic farthest-point initialisation
from the unit of largest norm; an empty cluster keeps its centroid; the final assignment is to the
nearest final centroid). Centroid c gives rank c of the merged
adapter: a'[:, c] = c_a, b'[c, :] = c_b.
Reweighting (`reweight=True`; our reading of the paper's dual reweighting, unverified): averaging shrinks
norms, so each centroid's a and b parts are rescaled to the mean norms of their members' a and b parts.

(Zhao et al., 2024, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering", arXiv:2409.16167; no public code.) Stacked factors [L, in, r] are clustered per
layer. Returns {path: (a [.., in, k], b [.., k, out])} with scale 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from merging._lora_combine import lora_factors
from merging._registry import register_merge


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(x: jnp.ndarray, k: int, iters: int = 50):
  """(centroids [k, d], assignment [n]) of `iters` rounds of Lloyd's k-means from a farthest-point
  initialisation (the unit of largest norm, then repeatedly the unit farthest from those chosen); k <= n."""
  n = x.shape[0]
  first = jnp.argmax(jnp.sum(x * x, axis=1))
  idx = jnp.zeros((k,), jnp.int32).at[0].set(first)
  d2 = jnp.sum(jnp.square(x - x[first]), axis=1)

  def pick(j, carry):
    idx, d2 = carry
    nxt = jnp.argmax(d2)
    return idx.at[j].set(nxt), jnp.minimum(d2, jnp.sum(jnp.square(x - x[nxt]), axis=1))
  idx, _ = jax.lax.fori_loop(1, k, pick, (idx, d2))

  def assign(c):
    return jnp.argmin(jnp.sum(jnp.square(x[:, None, :] - c[None]), axis=-1), axis=1)

  def lloyd(_, c):
    onehot = (assign(c)[:, None] == jnp.arange(k)[None]).astype(x.dtype)
    count = jnp.sum(onehot, axis=0)
    return jnp.where(count[:, None] > 0, (onehot.T @ x) / jnp.maximum(count, 1)[:, None], c)
  c = jax.lax.fori_loop(0, iters, lloyd, x[idx])
  del n
  return c, assign(c)


def _lego_one(units_a, units_b, k, iters, reweight):
  din = units_a.shape[1]
  x = jnp.concatenate([units_a, units_b], axis=1)
  c, assign = kmeans(x, min(k, x.shape[0]), iters)
  ca, cb = c[:, :din], c[:, din:]
  if reweight:
    onehot = (assign[:, None] == jnp.arange(c.shape[0])[None]).astype(x.dtype)
    count = jnp.maximum(jnp.sum(onehot, axis=0), 1)
    na = (onehot.T @ jnp.linalg.norm(units_a, axis=1)) / count
    nb = (onehot.T @ jnp.linalg.norm(units_b, axis=1)) / count
    ca = ca * (na / jnp.maximum(jnp.linalg.norm(ca, axis=1), 1e-12))[:, None]
    cb = cb * (nb / jnp.maximum(jnp.linalg.norm(cb, axis=1), 1e-12))[:, None]
  return ca.T, cb


@register_merge("lora_lego", kind="lora", base="unused", per_model=("weight",))
def lora_lego(loras, *, k=None, weight=1.0, iters: int = 50, reweight: bool = True):
  """LoRA-LEGO (module docstring). k: the merged rank (default: the largest input rank)."""
  n = len(loras)
  weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * n
  out = {}
  for path in loras[0]:
    fac = [lora_factors(l[path]) for l in loras]
    rank = k or max(f[0].shape[-1] for f in fac)
    lead = fac[0][0].shape[:-2]
    a_out, b_out = [], []
    for idx in np.ndindex(*lead):
      ua = jnp.concatenate([f[0][idx].T for f in fac], axis=0)                   # [R, in]
      ub = jnp.concatenate([w * f[2] * f[1][idx] for w, f in zip(weights, fac)])  # [R, out]
      a, b = _lego_one(ua, ub, rank, iters, reweight)
      a_out.append(a); b_out.append(b)
    if lead:
      out[path] = (jnp.stack(a_out).reshape(lead + a_out[0].shape), jnp.stack(b_out).reshape(lead + b_out[0].shape))
    else:
      out[path] = (a_out[0], b_out[0])
  return out
