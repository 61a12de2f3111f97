"""Task arithmetic and the generalized task arithmetic that TIES, DARE, DELLA and breadcrumbs share.

    tau_i = theta_i - theta_base,   d_i = w_i S(tau_i)    (S: an optional sparsifier, merging._sparsify)
    no consensus:  tau = sum_i d_i / (sum_i w_i if normalize)
    consensus:     tau = disjoint_mean(d, w, [sign(d_i) == gamma])     (merging._consensus)
    theta = theta_base + lambda tau

(Ilharco et al., 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089.) The order (sparsify,
then weight, then elect on the weighted deltas, divide by the agreeing weights) is mergekit 0.1.5's
`GeneralizedTaskArithmeticMerge`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from merging._consensus import agreement, disjoint_mean
from merging._registry import register_merge
from merging._sparsify import sparsify


def generalized_task_arithmetic(base, models, *, weight, density=None, key=None, row_axis: int = -1,
                                sparsifier: Optional[str] = None, consensus: Optional[str] = None,
                                normalize: bool = False, rescale=None, lambda_: float = 1.0,
                                gamma=None, epsilon=None, masks=None) -> jax.Array:
  """One tensor: base [...], models N x [...], per-model weight/density/gamma/epsilon lists."""
  n = len(models)
  deltas = []
  for i, x in enumerate(models):
    d = x - base
    if sparsifier:
      d = sparsify(d, density[i], sparsifier, key=jax.random.fold_in(key, i), rescale=rescale,
                   gamma=0.01 if gamma is None else gamma[i], epsilon=0.15 if epsilon is None else epsilon[i],
                   row_axis=row_axis, mask=None if masks is None else masks[i])
    deltas.append(d)
  deltas = jnp.stack(deltas)
  w = jnp.asarray(weight, jnp.float32).reshape((n,) + (1,) * base.ndim)
  deltas = deltas * w
  if consensus:
    mixed = disjoint_mean(deltas, w, agreement(deltas, consensus), normalize=normalize)
  else:
    mixed = jnp.sum(deltas, axis=0)
    if normalize:
      div = jnp.sum(w)
      mixed = mixed / jnp.where(jnp.abs(div) < 1e-8, 1.0, div)
  if lambda_ != 1:
    mixed = mixed * lambda_
  return base + mixed


@register_merge("task_arithmetic", per_model=("weight",))
def task_arithmetic(base, models, *, weight=1.0, lambda_: float = 1.0, normalize: bool = False,
                    key=None, row_axis=-1):
  """theta = theta_base + lambda sum_i w_i tau_i  (/ sum_i w_i with normalize). mergekit `task_arithmetic`."""
  del key
  return generalized_task_arithmetic(base, models, weight=weight, lambda_=lambda_, normalize=normalize,
                                     row_axis=row_axis)
