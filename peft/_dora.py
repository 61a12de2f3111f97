"""DoRA: weight-decomposed low-rank adaptation, a learned magnitude times a LoRA-updated direction.

    W' = m * (W0 + s A B) / ||W0 + s A B||,   the norm per output unit, detached from the graph

(Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353, §4.3 for the detached
norm.) Torch's weight is [out, in] and PEFT takes the norm over dim 1 (`in`); our kernel is [in, out], so the
norm runs over axis -2 and m has one entry per output unit. m starts at ||W0 + s A B|| (= ||W0|| with B = 0),
so the adapter starts as the identity. Unlike LoRA, DoRA materialises W0 + s A B inside the layer for the norm
(about twice LoRA's cost).

Dropout follows PEFT's `DoraLinearVariant.forward`: without it y = g (x W0 + s (x A) B) with g = m / ||.||;
with it y = x W0 + (g - 1) (x' W0) + g s (x' A) B where x' = drop(x).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._node import AdapterSpec, adapter_node, input_dropout, register_adapter, register_hf_format
from peft._node import static_field
from peft._core import Adapter
from peft._init import init_factors
from peft._lora import LoRA, LowRankFactors, _stack, base_dtype
from peft._quant import float_weight, like_base


def column_norm(w: jax.Array) -> jax.Array:
  """||w||_2 over the `in` axis of [..., in, out] -> [..., out], in float32."""
  return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


@register_hf_format
@adapter_node
class DoRA(LowRankFactors, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                      # [..., in, r]
  b: jax.Array                      # [..., r, out]
  m: jax.Array                      # [..., out] magnitude
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (with_dropout_rng)
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)

  trainable_fields = ("a", "b", "m")
  hf_peft_type = "LORA"

  def gain(self, w: jax.Array) -> jax.Array:
    """m / sg(||W0 + s A B||) [..., out]."""
    norm = jax.lax.stop_gradient(column_norm(w + self.delta(w.dtype)))
    return self.m.astype(jnp.float32) / norm

  def dot(self, x):
    w = float_weight(self.base, x.dtype)
    g = self.gain(w).astype(x.dtype)
    a, b = self.a.astype(x.dtype), self.b.astype(x.dtype)
    base_out = jnp.einsum("...i,io->...o", x, w)
    if self.rng is None or self.dropout == 0.0:
      return g * (base_out + self.scale * (x @ a) @ b)
    xd = input_dropout(x, self.dropout, self.rng)
    return base_out + (g - 1) * jnp.einsum("...i,io->...o", xd, w) + g * self.scale * (xd @ a) @ b

  def materialize(self):
    w = float_weight(self.base, jnp.float32)
    return ((w + self.delta()) * self.gain(w)[..., None, :]).astype(base_dtype(self.base))

  # ---- HF PEFT format: LoRA's plus lora_magnitude_vector [out] ------------------------------------------
  @classmethod
  def hf_accepts(cls, config) -> bool:
    return bool(config.get("use_dora", False))

  hf_tensor_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

  def hf_tensors(self):
    return {"lora_A.weight": np.asarray(self.a).T, "lora_B.weight": np.asarray(self.b).T,
            "lora_magnitude_vector": np.asarray(self.m)}

  @classmethod
  def hf_config(cls, nodes, spec):
    return {**LoRA.hf_config(nodes, spec), "use_dora": True}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked):
    a = _stack([l["lora_A.weight"].T for l in layers], stacked)
    b = _stack([l["lora_B.weight"].T for l in layers], stacked)
    m = _stack([l["lora_magnitude_vector"] for l in layers], stacked)
    return cls(base, a, b, m, scale=LoRA.hf_scale(config, module, a.shape[-1]),
               dropout=float(config.get("lora_dropout", 0.0)))


@register_adapter("dora")
def make_dora(base, spec: AdapterSpec, rng, path: str) -> DoRA:
  del path
  w = float_weight(base, jnp.float32)
  a, b, res = init_factors(spec.init, w, spec.rank, spec.scale, rng)
  if res is not None:
    base, w = like_base(base, res), float_weight(like_base(base, res), jnp.float32)
  node = DoRA(base, a.astype(spec.dtype), b.astype(spec.dtype), jnp.zeros(w.shape[:-2] + w.shape[-1:]),
              scale=spec.scale, dropout=spec.dropout)
  return node.replace(m=column_norm(w + node.delta()).astype(spec.dtype))
