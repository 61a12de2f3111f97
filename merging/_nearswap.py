"""NearSwap: take the model's value where it is close to the base.

    w = clamp(t / max(|theta_base - theta_1|, 1e-6), 0, 1);   theta = w theta_1 + (1 - w) theta_base

mergekit 0.1.5 `nearswap` (one model; `t` required).
"""
import jax.numpy as jnp

from merging._registry import register_merge


@register_merge("nearswap", per_model=())
def nearswap(base, models, *, t: float, key=None, row_axis=-1):
  """NearSwap (module docstring)."""
  del key, row_axis
  if len(models) != 1:
    raise ValueError("nearswap takes a base and exactly one model")
  b = models[0]
  w = jnp.clip(t / jnp.maximum(jnp.abs(base - b), 1e-6), 0.0, 1.0)
  return w * b + (1 - w) * base
