"""Sign election and the disjoint mean (TIES steps 2 and 3), shared by TIES-family methods, SCE and the
LoRA `ties` combination.

    gamma = sign(sum_i d_i)           ("sum", TIES)      or sign(sum_i sign(d_i))   ("count")
    with ties (a zero sum) broken to +1, as mergekit does;
    agree_i = [sign(d_i) == gamma]    (trimmed zeros never agree)
    disjoint mean = sum_i d_i agree_i / sum_i w_i agree_i   ("weight", mergekit; a zero divisor -> 1)
                  = sum_i d_i agree_i / max(1, sum_i agree_i) ("count", PEFT's `disjoint_merge`)
where d_i = w_i tau_i are the weighted, trimmed task vectors stacked on axis 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CONSENSUS = ("sum", "count")


def elect_sign(deltas: jax.Array, method: str = "sum") -> jax.Array:
  """+1 / -1 per position from the stacked deltas [N, ...]."""
  if method == "sum":
    s = jnp.sum(deltas, axis=0)
  elif method == "count":
    s = jnp.sum(jnp.sign(deltas), axis=0)
  else:
    raise ValueError(f"consensus must be one of {CONSENSUS}, got {method!r}")
  return jnp.where(s >= 0, 1.0, -1.0).astype(deltas.dtype)


def agreement(deltas: jax.Array, method: str = "sum") -> jax.Array:
  """[N, ...] float mask: entry i agrees with the elected sign (zeros never do)."""
  return (jnp.sign(deltas) == elect_sign(deltas, method)[None]).astype(deltas.dtype)


def disjoint_mean(deltas: jax.Array, weights: jax.Array, mask: jax.Array, *, normalize: bool = True,
                  divide_by: str = "weight") -> jax.Array:
  """sum_i deltas_i mask_i, divided per position by sum_i w_i mask_i ("weight") or the count ("count")."""
  mixed = jnp.sum(deltas * mask, axis=0)
  if not normalize:
    return mixed
  if divide_by == "weight":
    w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
    div = jnp.sum(w * mask, axis=0)
    div = jnp.where(div == 0, 1.0, div)
  elif divide_by == "count":
    div = jnp.maximum(jnp.sum(mask, axis=0), 1.0)
  else:
    raise ValueError(f"divide_by must be 'weight' or 'count', got {divide_by!r}")
  return mixed / div
