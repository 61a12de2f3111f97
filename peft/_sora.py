"""SoRA: LoRA with a gate on every rank, made sparse by a proximal L1 step, and pruned to its live ranks.

    y = x W0 + s ((drop(x) A) ⊙ g) B,     A [in, r], g [r], B [r, out],   s = alpha / r

The loss gets the mean L1 of all gates, `sparse_lambda * sum|g| / #gates` over the whole model (the
reference trainer's `compute_loss`; here through `Adapter.regularizer`), and after every optimizer step the
gates go through the proximal map of `sparse_lambda_2 * |g|` (`optim/_sora.py`, an optax transformation
the run's optimizer is wrapped in). Ranks whose gate is exactly zero contribute nothing; `sora_prune`
turns every node into a plain LoRA node of the largest live rank over its layers (g folded into A), which
exports in PEFT's LoRA format.

(Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP;
TsinghuaC3I/SoRA `src/lora.py`, `src/sparse_optimizer.py`, `src/trainer.py`.) Init as the reference:
Kaiming-uniform A, B = 0, g ~ N(0, 1). Defaults sparse_lambda = sparse_lambda_2 = 1e-3 are its `run_glue.py`
argument defaults (its GLUE scripts use 10 and 3e-4).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot, is_adapter
from peft._init import init_factors
from peft._lora import LoRA, LowRankShape
from peft._node import (AdapterSpec, adapter_node, input_dropout, options_with_defaults, register_adapter,
                        static_field)
from peft._quant import float_weight

SORA_OPTIONS = dict(sparse_lambda=1e-3, sparse_lambda_2=1e-3, reference_threshold=False)


def sora_options(given) -> dict:
  """`config.peft.options` of a SoRA run over the defaults; an unknown key raises."""
  return options_with_defaults("sora", SORA_OPTIONS, given)


@adapter_node
class SoRA(LowRankShape, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                      # [..., in, r]
  b: jax.Array                      # [..., r, out]
  g: jax.Array                      # [..., r] gates
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (peft.with_dropout_rng)
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)
  sparse_lambda: float = static_field(default=1e-3)   # weight of the gates' mean L1 in the loss

  trainable_fields = ("a", "b", "g")

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, self.a.astype(x.dtype)) * self.g.astype(x.dtype)
    return dot(x, self.base) + jnp.einsum("...r,ro->...o", low, self.b.astype(x.dtype)) * self.scale

  def materialize(self):
    ag = self.a.astype(jnp.float32) * self.g.astype(jnp.float32)[..., None, :]
    delta = self.scale * jnp.einsum("...ir,...ro->...io", ag, self.b.astype(jnp.float32))
    return (float_weight(self.base, jnp.float32) + delta).astype(jnp.dtype(self.base.dtype))

  def regularizer(self):
    if not self.sparse_lambda:
      return None
    return {"sora_l1": (self.sparse_lambda * jnp.sum(jnp.abs(self.g.astype(jnp.float32))), int(self.g.size))}


def sora_prune(params):
  """Every SoRA node as a LoRA node without its zero-gated ranks: rank k = the most live gates of any of its
  layers, live ranks first (g folded into A), zero columns where a layer has fewer. Same outputs."""
  def one(n):
    if not isinstance(n, SoRA):
      return n
    g = np.asarray(n.g, np.float32)
    live = g != 0
    k = max(int(live.sum(-1).max()), 1)
    order = np.argsort(~live, axis=-1, kind="stable")[..., :k]          # live ranks first, in order
    g_k = np.take_along_axis(g, order, -1)
    a_k = np.take_along_axis(np.asarray(n.a, np.float32), order[..., None, :], -1) * g_k[..., None, :]
    b_k = np.take_along_axis(np.asarray(n.b, np.float32), order[..., :, None], -2)
    dtype = n.a.dtype
    return LoRA(n.base, jnp.asarray(a_k, dtype), jnp.asarray(b_k, dtype), scale=n.scale, dropout=n.dropout)
  return jax.tree.map(one, params, is_leaf=is_adapter)


@register_adapter("sora")
def make_sora(base, spec: AdapterSpec, rng, path: str) -> SoRA:
  """rank r gates; options sparse_lambda (loss L1), sparse_lambda_2 (proximal step, read by the optimizer)."""
  del path
  opts = sora_options(spec.options)
  k_ab, k_g = jax.random.split(rng)
  a, b, res = init_factors(spec.init, float_weight(base, jnp.float32), spec.rank, spec.scale, k_ab)
  if res is not None:
    raise ValueError("sora: residual inits (pissa, olora) are not supported; use default or gaussian")
  g = jax.random.normal(k_g, a.shape[:-2] + (spec.rank,), jnp.float32)
  return SoRA(base, a.astype(spec.dtype), b.astype(spec.dtype), g.astype(spec.dtype), scale=spec.scale,
              dropout=spec.dropout, sparse_lambda=float(opts["sparse_lambda"]))
