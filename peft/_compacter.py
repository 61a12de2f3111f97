r"""Compacter: a bottleneck adapter whose projections are sums of Kronecker products with shared slow weights.

Mahabadi, Henderson and Ruder, 2021, *Compacter: Efficient Low-Rank Hypercomplex Adapter Layers*
(arXiv 2106.04647); reference `rabeehk/compacter` (`seq2seq/hypercomplex/layers.py: PHMLinear`, defaults
from `seq2seq/configs/compacter.json`). On the output h = x W0 of the adapted layer:

.. math::

  h' = h + \mathrm{gelu}(h W_D + b_D)\, W_U + b_U, \qquad
  W = \sum_{i=1}^{n} A_i \otimes B_i, \qquad B_i = s_i t_i^T

for both projections, W_D [d, k] and W_U [k, d] with k = d / `reduction_factor` (rounded up to a multiple of
n: the Kronecker form needs d and k divisible by n). The "slow" weights A_i (n x n, the PHM rule) are shared
by every layer and by both projections; the "fast" weights B_i [d/n, k/n] (or [k/n, d/n]) are rank-1
(`factorized_phm`, `phm_rank` 1) per layer. Defaults of `compacter.json`: n = 4 (`hypercomplex_division`),
reduction factor 32, gelu_new (tanh approximation), A_i ~ N(0, 1e-4²) (`phm_c_init` normal,
`phm_init_range` 1e-4), s_i and t_i Glorot-uniform per i, biases 0, learning rate 3e-3 on T5-base.

Trainable parameters: n³ (shared, once per adapted kernel path) + per layer
2 r (d + k) + k + d (r = `phm_rank`: rank-1 factors of both projections, and their biases); the paper's
count 4L(k + d) + n³ (two adapters per block) leaves the biases out.

Differences from the reference: it shares one A across all adapters of the model; a node here holds one A
per adapted kernel (e.g. one for every `down_proj` of the stack, one for every `o_proj`). The adapter sees
`x W0`, not the layer's bias (as (IA)^3 here). `unfreeze_layer_norms` of the config file is not applied
(train the norms with `config.optim.rules` if wanted). Place it where the reference does, after the
feed-forward (and attention) output: targets `down_proj` (and `o_proj`). The adapter is non-linear, so it
cannot be merged (`materialize` raises).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from peft._core import Adapter, dot
from peft._node import AdapterSpec, adapter_node, register_adapter, static_field


def kron_sum(rule: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
  """sum_i A_i ⊗ (s_i t_i^T): rule [n, n, n], s [n, p, r], t [n, r, q] -> [n p, n q]."""
  n, p, q = rule.shape[0], s.shape[-2], t.shape[-1]
  b = jnp.einsum("...ipr,...irq->...ipq", s, t)                 # B_i [n, p, q]
  w = jnp.einsum("iab,...ipq->...apbq", rule, b)                # (A_i ⊗ B_i)[a p + x, b q + y], summed
  return w.reshape(w.shape[:-4] + (n * p, n * q))


@adapter_node
class Compacter(Adapter):
  base: Any               # [..., d_in, d] kernel or QuantizedWeight
  rule: jax.Array         # [n, n, n] A_i, shared by every layer and both projections (no layer axis)
  down_s: jax.Array       # [..., n, d/n, r]
  down_t: jax.Array       # [..., n, r, k/n]
  down_bias: jax.Array    # [..., k]
  up_s: jax.Array         # [..., n, k/n, r]
  up_t: jax.Array         # [..., n, r, d/n]
  up_bias: jax.Array      # [..., d]

  trainable_fields = ("rule", "down_s", "down_t", "down_bias", "up_s", "up_t", "up_bias")

  # The layer scan slices every child along the layer axis; the shared rule has none: close over it.
  def scan_parts(self):
    return self.replace(rule=None), self.rule

  def scan_bind(self, closed):
    return self.replace(rule=closed)

  def dot(self, x):
    h = dot(x, self.base)
    f = lambda z: z.astype(x.dtype)
    w_down = kron_sum(f(self.rule), f(self.down_s), f(self.down_t))
    w_up = kron_sum(f(self.rule), f(self.up_s), f(self.up_t))
    z = jax.nn.gelu(h @ w_down + f(self.down_bias), approximate=True)
    return h + z @ w_up + f(self.up_bias)

  def materialize(self):
    raise ValueError("Compacter is a non-linear bottleneck on the layer's output: it has no merged weight; "
                     "keep the adapter (or strip it for the base model)")


def _glorot(rng, shape):
  fan_in, fan_out = shape[-1], shape[-2]        # torch's xavier_uniform_ on each [.., a, b] slice
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


@register_adapter("compacter")
def make_compacter(base, spec: AdapterSpec, rng, path: str) -> Compacter:
  """options: `n` (4), `reduction_factor` (32), `phm_rank` (1), `phm_init_range` (1e-4)."""
  del path
  if spec.init != "default":
    raise ValueError(f"compacter has no init {spec.init!r}")
  n = int(spec.options.get("n", 4))
  red = int(spec.options.get("reduction_factor", 32))
  r = int(spec.options.get("phm_rank", 1))
  std = float(spec.options.get("phm_init_range", 1e-4))
  shape = tuple(base.shape) if hasattr(base, "ndim") else tuple(base.codes.shape[:-2]) + tuple(base.shape)
  lead, d = shape[:-2], shape[-1]
  if d % n:
    raise ValueError(f"compacter: the layer's output width {d} is not divisible by n={n}")
  k = n * max(1, math.ceil(d / (red * n)))
  keys = jax.random.split(rng, 5)
  dt = jnp.dtype(spec.dtype)
  return Compacter(
      base,
      rule=(std * jax.random.normal(keys[0], (n, n, n), jnp.float32)).astype(dt),
      down_s=_glorot(keys[1], lead + (n, d // n, r)).astype(dt),
      down_t=_glorot(keys[2], lead + (n, r, k // n)).astype(dt),
      down_bias=jnp.zeros(lead + (k,), dt),
      up_s=_glorot(keys[3], lead + (n, k // n, r)).astype(dt),
      up_t=_glorot(keys[4], lead + (n, r, d // n)).astype(dt),
      up_bias=jnp.zeros(lead + (d,), dt))
