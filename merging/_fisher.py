"""Fisher merging: a per-entry precision-weighted average of the models.

    F_i = E_x E_{y ~ p_theta_i(.|x)} [(d/d theta log p_theta_i(y|x))^2]     (diagonal Fisher)
    theta* = sum_i w_i F_i' theta_i / sum_i w_i F_i',   F_i' = max(F_i, floor)

with floor = 1e-6 applied to the first (target) model only (`favor_target_model=True`, the default of the
reference `mmatena/model_merging`), or to every model (`favor_target_model=False`), so the denominator
never vanishes. (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging",
arXiv:2111.09832.) Not in mergekit. The base is not used.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from merging._registry import register_merge


def fisher_diagonal(log_prob_fn: Callable, params, batches: Iterable, rng: jax.Array):
  """The empirical diagonal Fisher of `params`, averaged over every example of `batches`.

  Args:
    log_prob_fn: (params, batch, rng) -> [B] per-sequence log p(y|x) of labels y that the function samples
      from the model itself with `rng` (e.g. `jax.random.categorical(rng, logits)` per position, summed
      over the sequence's target tokens). It is called on one example at a time (leaves [1, ...]).
    params: the parameter tree (arrays).
    batches: an iterable of batches (trees of arrays with a leading batch axis B).
    rng: the key; example j of batch b gets `fold_in(fold_in(rng, b), j)`.
  Returns:
    A float32 tree like `params`: (1/n) sum over the n examples of (grad log p(y|x))^2. Per-example
    gradients are accumulated in a scan, so memory is two copies of the parameters.
  """
  def sq_grad(p, ex, key):
    one = jax.tree_util.tree_map(lambda x: x[None], ex)
    g = jax.grad(lambda q: log_prob_fn(q, one, key)[0])(p)
    return jax.tree_util.tree_map(lambda t: jnp.square(t.astype(jnp.float32)), g)

  @jax.jit
  def batch_sum(p, batch, key):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    def body(acc, xs):
      ex, j = xs
      g = sq_grad(p, ex, jax.random.fold_in(key, j))
      return jax.tree_util.tree_map(jnp.add, acc, g), None
    zero = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, jnp.float32), p)
    acc, _ = jax.lax.scan(body, zero, (batch, jnp.arange(size)))
    return acc

  total, n = None, 0
  for b, batch in enumerate(batches):
    s = batch_sum(params, batch, jax.random.fold_in(rng, b))
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    n += jax.tree_util.tree_leaves(batch)[0].shape[0]
  if total is None:
    raise ValueError("fisher_diagonal needs at least one batch")
  return jax.tree_util.tree_map(lambda t: t / n, total)


@register_merge("fisher", base="unused", per_model=("weight",), tensor_params=("fisher",),
                estimators={"fisher": fisher_diagonal})
def fisher(base, models, *, fisher, weight=1.0, floor: float = 1e-6, favor_target_model: bool = True,
           key=None, row_axis=-1):
  """Fisher-weighted average; `fisher` is one diagonal-Fisher tree per model (module docstring)."""
  del base, key, row_axis
  num, den = 0.0, 0.0
  for i, (x, f, w) in enumerate(zip(models, fisher, weight)):
    if not favor_target_model or i == 0:
      f = jnp.maximum(f, floor)
    num = num + w * f * x
    den = den + w * f
  return num / den
