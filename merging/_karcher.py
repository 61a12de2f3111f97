"""Karcher (Riemannian) mean on the unit sphere, rescaled by the mean norm.

    u_i = theta_i / |theta_i|;  mu <- normalised sum_i a_i u_i   (a_i = 1/N over the inputs of norm > tol)
    repeat max_iter times:  v = sum_i a_i (t_i / sin t_i)(u_i - cos t_i mu),  t_i = arccos <mu, u_i>
                            (terms with t_i < tol skipped); stop if |v| < tol;
                            mu <- cos|v| mu + sin|v| v/|v|, renormalised
    theta = (sum_i alpha_i |theta_i|) mu,   alpha_i = 1/N over all inputs

mergekit 0.1.5 `karcher` (uniform weights; max_iter=10, tol=1e-5). The base is not used; `weight`
(default uniform) replaces the 1/N weights if given.
"""
import jax.numpy as jnp

from merging._registry import register_merge


def karcher_mean(tensors, alphas, max_iter: int = 10, tol: float = 1e-5):
  if len(tensors) == 1:
    return tensors[0]
  norms = [jnp.linalg.norm(x.reshape(-1)) for x in tensors]
  units = [jnp.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(tensors, norms)]
  valid = [i for i, n in enumerate(norms) if float(n) > tol]
  if not valid:
    return jnp.zeros_like(tensors[0])
  total = sum(alphas[i] for i in valid)
  a = [alphas[i] / total for i in valid]
  us = [units[i] for i in valid]
  mean = jnp.zeros_like(us[0])
  for ai, u in zip(a, us):
    mean = mean + ai * u
  mn = jnp.linalg.norm(mean.reshape(-1))
  mean = us[0] if float(mn) < tol else mean / mn
  for _ in range(max_iter):
    tangent = jnp.zeros_like(mean)
    for ai, u in zip(a, us):
      dot = jnp.clip(jnp.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
      theta = jnp.arccos(dot)
      if float(theta) < tol:
        continue
      tangent = tangent + ai * (theta / jnp.sin(theta)) * (u - dot * mean)
    tn = jnp.linalg.norm(tangent.reshape(-1))
    if float(tn) < tol:
      break
    mean = jnp.cos(tn) * mean + jnp.sin(tn) * (tangent / tn)
    un = jnp.linalg.norm(mean.reshape(-1))
    if float(un) > tol:
      mean = mean / un
  scale = sum(al * n for al, n in zip(alphas, norms))
  return scale * mean


@register_merge("karcher", base="unused", per_model=("weight",), jit=False)   # data-dependent loop
def karcher(base, models, *, weight=None, max_iter: int = 10, tol: float = 1e-5, key=None, row_axis=-1):
  """Karcher mean of the models (module docstring)."""
  del base, key, row_axis
  n = len(models)
  alphas = [1.0 / n] * n if weight is None or weight[0] is None else [w / sum(weight) for w in weight]
  return karcher_mean(models, alphas, max_iter, tol)
