"""SCE (FuseChat): select by variance, calculate weights, erase minority signs.

    tau_i = theta_i - theta_base
    select: keep the top floor(select_topk * #{var != 0}) positions of var_i(tau_i) (population variance
            across the models), zero the rest (select_topk=1: keep all)
    weights: c_i = mean(tau_i^2) / sum_j mean(tau_j^2)  (uniform if the sum is < 1e-6)
    erase:  e_i = [sign(tau_i) == sign(sum_j tau_j)]    (TIES sign election, ties -> +)
    theta = theta_base + sum_i c_i e_i tau_i / max(sum_i c_i e_i, 1e-6)

(Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990.) mergekit 0.1.5 `sce`.
"""
import jax.numpy as jnp

from merging._consensus import agreement
from merging._registry import register_merge
from merging._sparsify import topk_mask


def sce_mask(tvs, select_topk: float):
  if select_topk <= 0:
    return jnp.zeros(tvs.shape[1:], tvs.dtype)
  if select_topk >= 1:
    return jnp.ones(tvs.shape[1:], tvs.dtype)
  var = jnp.var(tvs, axis=0)
  k = jnp.floor(jnp.count_nonzero(var) * select_topk).astype(jnp.int32)
  return topk_mask(jnp.abs(var), k).astype(tvs.dtype)


@register_merge("sce", per_model=())
def sce(base, models, *, select_topk: float = 1.0, key=None, row_axis=-1):
  """SCE (module docstring)."""
  del key, row_axis
  tvs = jnp.stack([x - base for x in models])
  if select_topk < 1:
    tvs = tvs * sce_mask(tvs, select_topk)[None]
  erase = agreement(tvs, "sum")
  c = jnp.mean(jnp.square(tvs).reshape(len(models), -1), axis=1)
  total = jnp.sum(c)
  c = jnp.where(jnp.abs(total) < 1e-6, 1.0 / len(models), c / jnp.where(jnp.abs(total) < 1e-6, 1.0, total))
  ce = c.reshape((-1,) + (1,) * base.ndim) * erase
  return base + jnp.sum(tvs * ce, axis=0) / jnp.maximum(jnp.sum(ce, axis=0), 1e-6)
