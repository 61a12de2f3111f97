r"""FLoRA: a Tucker-form update, a small trained core between two trained factor matrices.

Si et al., 2024, *FLoRA: Low-Rank Core Space for N-dimension* (arXiv 2405.14739); reference
`SJTU-DeepVisionLab/FLoRA: flora/layers.py`. For an N-mode weight the update is the Tucker product
ΔW = s · G ×₁ U₁ ×₂ U₂ … ×_N U_N; a linear layer has N = 2 modes (in, out), so

.. math::

  \Delta W = s\, U_1 G U_2^T, \qquad y = x W_0 + s\, ((x U_1) G) U_2^T

with U₁ [in, r₁], G [r₁, r₂], U₂ [out, r₂] all trained (the reference's `param_0`, `param_G`, `param_1`;
its torch weight is ΔWᵀ). Init as the reference: G = 0 (the adapter starts as the identity), U₁ and U₂
Kaiming-normal with a = √3 over torch's fan-in (the rank): std 1/sqrt(2 r). s is a plain scale, not α/r
(`options.scale`, default 4.0 as the reference's example config); ranks r₁ = r₂ = `rank` unless
`options.ranks = (r1, r2)`. Trainable parameters per matrix: in·r₁ + r₁·r₂ + out·r₂.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from peft._core import Adapter, dot
from peft._lora import base_dtype
from peft._node import AdapterSpec, adapter_node, input_dropout, register_adapter, static_field
from peft._quant import float_weight


@adapter_node
class FLoRA(Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  u1: jax.Array                     # [..., in, r1]
  core: jax.Array                   # [..., r1, r2]   G
  u2: jax.Array                     # [..., out, r2]
  rng: Optional[jax.Array] = None   # dropout keys (with_dropout_rng)
  scale: float = static_field(default=4.0)
  dropout: float = static_field(default=0.0)

  trainable_fields = ("u1", "core", "u2")

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return self.u1.shape[:-2]

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    h = jnp.einsum("...i,ia->...a", xd, self.u1.astype(x.dtype))
    h = jnp.einsum("...a,ab->...b", h, self.core.astype(x.dtype))
    return dot(x, self.base) + self.scale * jnp.einsum("...b,ob->...o", h, self.u2.astype(x.dtype))

  def delta(self) -> jax.Array:
    """s U1 G U2^T [..., in, out] in float32."""
    f = lambda z: z.astype(jnp.float32)
    return self.scale * jnp.einsum("...ia,...ab,...ob->...io", f(self.u1), f(self.core), f(self.u2))

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(base_dtype(self.base))


@register_adapter("flora")
def make_flora(base, spec: AdapterSpec, rng, path: str) -> FLoRA:
  """spec.rank (r1 = r2), spec.dropout; options: `scale` (4.0), `ranks` ((r1, r2))."""
  del path
  if spec.init != "default":
    raise ValueError(f"flora has no init {spec.init!r}")
  r1, r2 = tuple(spec.options.get("ranks", (spec.rank, spec.rank)))
  shape = tuple(base.shape) if hasattr(base, "ndim") else tuple(base.codes.shape[:-2]) + tuple(base.shape)
  lead, (din, dout) = shape[:-2], shape[-2:]
  k1, k2 = jax.random.split(rng)
  # kaiming_normal_(a=sqrt(3)) on [dim, r]: gain sqrt(2 / (1 + 3)), torch's fan_in = r.
  u1 = jax.random.normal(k1, lead + (din, r1), jnp.float32) / jnp.sqrt(2.0 * r1)
  u2 = jax.random.normal(k2, lead + (dout, r2), jnp.float32) / jnp.sqrt(2.0 * r2)
  core = jnp.zeros(lead + (r1, r2), jnp.float32)
  dt = jnp.dtype(spec.dtype)
  return FLoRA(base, u1.astype(dt), core.astype(dt), u2.astype(dt),
               scale=float(spec.options.get("scale", 4.0)), dropout=spec.dropout)
