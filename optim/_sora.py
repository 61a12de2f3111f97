r"""SoRA's proximal step on the rank gates, as an optax transformation chained after the run's optimizer.

With w = g + u the gate after the inner update, the proximal map of lambda |g| is the soft threshold

    prox(w) = sign(w) max(|w| - lambda, 0),

and the update becomes prox(w) - g, so gates that reach zero stay exactly zero until a gradient pushes them
past lambda. lambda is `sparse_lambda_2`, a float or an optax schedule of the step count (the reference
steps it through a list between training rounds). It is not multiplied by the learning rate, as in the
reference's `SparseAdamW` (its `sparse_optimizer_multiply_lr.py` variant does; `lr_scaled` here needs the
rate, so it is left out). `reference_threshold=True` reproduces the reference's three in-place masked
assignments, which zero gates with lambda < |w| < 2 lambda instead of shrinking them. Only the `g` leaves of
SoRA nodes change. (Ding et al., 2023, EMNLP; TsinghuaC3I/SoRA `src/sparse_optimizer.py`.)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import peft
from optim._registry import register_adapter_transform


class SoraProximalState(NamedTuple):
  count: jax.Array     # (), int32: steps so far (the argument of a lambda schedule)


def soft_threshold(w: jax.Array, lam) -> jax.Array:
  return jnp.sign(w) * jnp.maximum(jnp.abs(w) - lam, 0.0)


def reference_threshold(w: jax.Array, lam) -> jax.Array:
  """SparseAdamW's `p[p > l] -= l; p[p < -l] += l; p[|p| < l] = 0`, in that order."""
  w = jnp.where(w > lam, w - lam, w)
  w = jnp.where(w < -lam, w + lam, w)
  return jnp.where(jnp.abs(w) < lam, 0.0, w)


def _is_sora(x) -> bool:
  return isinstance(x, peft.SoRA)


def sora_proximal(sparse_lambda_2: optax.ScalarOrSchedule = 1e-3,
                  reference: bool = False) -> optax.GradientTransformation:
  """Proximal L1 step on the SoRA gates of the updates' tree (module docstring); chain it last."""
  threshold = reference_threshold if reference else soft_threshold

  def init_fn(params):
    del params
    return SoraProximalState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("sora_proximal needs params")
    lam = sparse_lambda_2(state.count) if callable(sparse_lambda_2) else sparse_lambda_2
    olds = iter([n for n in jax.tree.leaves(params, is_leaf=_is_sora) if _is_sora(n)])

    def one(u):
      if not _is_sora(u):
        return u
      g = next(olds).g
      w = g + u.g
      return u.replace(g=(threshold(w, jnp.asarray(lam, w.dtype)) - g).astype(u.g.dtype))
    return jax.tree.map(one, updates, is_leaf=_is_sora), SoraProximalState(state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


@register_adapter_transform("sora")
def sora_optimizer(config, trainable, tx):
  """The run's optimizer followed by the gates' proximal step (`config.peft.options.sparse_lambda_2`)."""
  del trainable
  opts = peft.sora_options(config.peft.get("options") or {})
  return optax.chain(tx, sora_proximal(float(opts["sparse_lambda_2"]), bool(opts["reference_threshold"])))
