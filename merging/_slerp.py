"""Spherical interpolation: SLERP between the base and one model, and NuSLERP between two models.

SLERP (whole tensor, flattened):  cos = <v0/|v0|, v1/|v1|> (norms <= 1e-8 taken as 1), clamped;
    theta = theta0 at t = 0; linear interpolation if |cos| > 0.9995, else
    theta = sin((1-t) a)/sin(a) v0 + sin(t a)/sin(a) v1,   a = arccos(cos)
with v0 the base and v1 the model (t = 0 gives the base). mergekit 0.1.5 `slerp` (per-layer `t` gradients
are not supported; give `t` per path with a regex dict).

NuSLERP: t = w_2 / (w_1 + w_2) (0.5 if the sum is < 1e-6); with a base the task vectors are interpolated
and added to it. Vectors are normalised with the norm clamped at 1e-7; if 1 - cos^2 <= 1e-16 the
interpolation is linear. `flatten=True` (default): one vector per tensor; else per row (`row_wise=False`,
a PyTorch row: one output) or per column (`row_wise=True`). mergekit 0.1.5 `nuslerp`.
"""
import jax.numpy as jnp

from merging._registry import register_merge


def slerp_arrays(t: float, v0, v1, dot_threshold: float = 0.9995, eps: float = 1e-8):
  n0, n1 = jnp.linalg.norm(v0.reshape(-1)), jnp.linalg.norm(v1.reshape(-1))
  n0 = jnp.where(n0 > eps, n0, 1.0)
  n1 = jnp.where(n1 > eps, n1, 1.0)
  dot = jnp.clip(jnp.sum((v0 / n0) * (v1 / n1)), -1.0, 1.0)
  lin = jnp.abs(dot) > dot_threshold
  theta = jnp.arccos(jnp.where(lin, 0.0, dot))
  s = jnp.sin(theta)
  ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / jnp.where(lin, 1.0, s))
  cb = jnp.where(lin, t, jnp.sin(t * theta) / jnp.where(lin, 1.0, s))
  return ca * v0 + cb * v1


@register_merge("slerp", per_model=())
def slerp(base, models, *, t: float, key=None, row_axis=-1):
  """SLERP from the base (t=0) to the one model (t=1) (module docstring)."""
  del key, row_axis
  if len(models) != 1:
    raise ValueError("slerp takes a base and exactly one model")
  return slerp_arrays(t, base, models[0])


def nuslerp_arrays(t: float, v0, v1, axis: int = -1, eps: float = 1e-8, flatten: bool = True):
  shape = v0.shape
  if flatten:
    v0, v1, axis = v0.reshape(-1), v1.reshape(-1), -1
  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-7)
  cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=axis, keepdims=True), -1.0, 1.0)
  colinear = (1 - jnp.square(cos)) <= eps ** 2
  theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
  s = jnp.where(colinear, 1.0, jnp.sin(theta))
  sph = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / s
  return jnp.where(colinear, (1 - t) * v0 + t * v1, sph).reshape(shape)


@register_merge("nuslerp", base="optional", per_model=("weight",))
def nuslerp(base, models, *, weight=1.0, row_wise: bool = False, flatten: bool = True, key=None, row_axis=-1):
  """NuSLERP of two models, of their task vectors if a base is given (module docstring)."""
  del key
  if len(models) != 2:
    raise ValueError("nuslerp takes exactly two models")
  total = sum(weight)
  t = 0.5 if abs(total) < 1e-6 else weight[1] / total
  # mergekit's dim=-1 is along a torch row; dim=0 across rows (the other axis).
  axis = row_axis if not row_wise else (-1 if row_axis == -2 else -2)
  if models[0].ndim < 2:
    axis = -1
  if base is not None:
    return base + nuslerp_arrays(t, models[0] - base, models[1] - base, axis, flatten=flatten)
  return nuslerp_arrays(t, models[0], models[1], axis, flatten=flatten)
