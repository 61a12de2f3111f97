"""LoRA-native combinations of adapters, as PEFT's `LoraModel.add_weighted_adapter`.

An adapter is {path: (a [.., in, r], b [.., r, out]) or (a, b, scale) or a `peft.LoRA` node}; its update
is dW = scale a b ([.., in, out], our layout; PEFT's lora_A/lora_B are a^T/b^T). The result is
{path: (a, b)} with scale folded in (scale 1, as PEFT's new adapter with lora_alpha = r):
  cat          a = [a_1 .. a_N] (ranks concatenated),  b = [w_1 s_1 b_1; ..; w_N s_N b_N]:
               exact, a b = sum_i w_i s_i a_i b_i
  linear       a = sum_i sgn(w_i s_i) sqrt|w_i s_i| a_i,  b = sum_i sqrt|w_i s_i| b_i (equal ranks): the
               product has cross terms a_i b_j; prefer cat or svd when the target is sum w dW
  svd          dW = sum_i w_i dW_i, truncated SVD to `rank` (default: the largest input rank);
               a = U_r, b = S_r V_r^T (PEFT puts S on the output side)
  ties / dare_linear / dare_ties / magnitude_prune
               PEFT's merge_utils on the full deltas dW_i (magnitude keeps int(density n) entries,
               DARE divides by density, signs elected on the unweighted trimmed deltas ("total" or
               "frequency") and the disjoint mean divides by the count of agreeing models), then the
               truncated SVD: PEFT's `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`.
DARE masks use `fold_in(tensor_key(seed, path), i)`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import peft
from merging._consensus import agreement, disjoint_mean
from merging._registry import register_merge, tensor_key
from merging._sparsify import random_mask, topk_mask

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def lora_factors(entry):
  """(a, b, scale) in float32 from a (a, b[, scale]) tuple or a `peft.LoRA` node."""
  if isinstance(entry, peft.LoRA):
    a, b, s = entry.a, entry.b, entry.scale
  else:
    a, b, *rest = entry
    s = rest[0] if rest else 1.0
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), float(s)


def lora_delta(entry) -> jax.Array:
  a, b, s = lora_factors(entry)
  return s * jnp.einsum("...ir,...ro->...io", a, b)


def truncated_svd(delta: jax.Array, rank: int):
  """(a = U_r [.., in, r], b = S_r V_r^T [.., r, out]) of delta [.., in, out]."""
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  return u[..., :rank], s[..., :rank, None] * vt[..., :rank, :]


def _prune_magnitude(x, density):
  if density >= 1:
    return x
  return jnp.where(topk_mask(jnp.abs(x), int(density * x.size)), x, 0.0)


def _combine_deltas(deltas, weights, combination, density, majority_sign_method, key):
  w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * deltas[0].ndim)
  if combination == "svd":
    return jnp.sum(jnp.stack(deltas) * w, axis=0)
  if combination in ("ties", "magnitude_prune"):
    t = jnp.stack([_prune_magnitude(d, density) for d in deltas])
  else:
    t = jnp.stack([d if density >= 1 else
                   jnp.where(random_mask(jax.random.fold_in(key, i), density, d.shape), d, 0.0) / density
                   for i, d in enumerate(deltas)])
  if combination in ("magnitude_prune", "dare_linear"):
    return jnp.sum(t * w, axis=0)
  mask = agreement(t, {"total": "sum", "frequency": "count"}[majority_sign_method])
  return disjoint_mean(t * w, w, mask, divide_by="count")


def combine_loras(loras, *, combination: str = "cat", weight=1.0, rank=None, density: float = 1.0,
                  majority_sign_method: str = "total", seed: int = 0):
  """Combines N adapters into one (module docstring). `weight`: a scalar or one per adapter."""
  if combination not in COMBINATIONS:
    raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
  n = len(loras)
  weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * n
  out = {}
  for path in loras[0]:
    fac = [lora_factors(l[path]) for l in loras]
    if combination == "cat":
      a = jnp.concatenate([f[0] for f in fac], axis=-1)
      b = jnp.concatenate([w * f[2] * f[1] for w, f in zip(weights, fac)], axis=-2)
    elif combination == "linear":
      if len({f[0].shape[-1] for f in fac}) != 1:
        raise ValueError(f"{path}: `linear` needs adapters of equal rank")
      ws = [w * f[2] for w, f in zip(weights, fac)]
      a = sum(math.copysign(math.sqrt(abs(x)), x) * f[0] for x, f in zip(ws, fac))
      b = sum(math.sqrt(abs(x)) * f[1] for x, f in zip(ws, fac))
    else:
      r = rank or max(f[0].shape[-1] for f in fac)
      deltas = [f[2] * jnp.einsum("...ir,...ro->...io", f[0], f[1]) for f in fac]
      a, b = truncated_svd(_combine_deltas(deltas, weights, combination, density, majority_sign_method,
                                           tensor_key(seed, path)), r)
    out[path] = (a, b)
  return out


def _register(combination):
  def fn(loras, *, weight=1.0, rank=None, density: float = 1.0, majority_sign_method: str = "total",
         seed: int = 0):
    return combine_loras(loras, combination=combination, weight=weight, rank=rank, density=density,
                         majority_sign_method=majority_sign_method, seed=seed)
  fn.__doc__ = f"PEFT's add_weighted_adapter(combination_type='{combination}'" + (
      "" if combination in ("cat", "linear", "svd") else "_svd") + "); see `combine_loras`."
  return register_merge(f"lora_{combination}", kind="lora", base="unused", per_model=("weight",))(fn)


lora_cat, lora_linear, lora_svd, lora_ties, lora_dare_linear, lora_dare_ties, lora_magnitude_prune = (
    _register(c) for c in COMBINATIONS)
