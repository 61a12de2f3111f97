"""MiSS (formerly Bone): block-wise updates of a frozen kernel from one small trained block.

Ours is the kernel W0 [in, out] (PEFT's weight transposed); its input rows come in chunks of r.

    default  ΔW0 = [D; D; ...; D][:in]        D [r, out]:  y = x W0 + (sum_j x_j) D,  x_j the j-th r-chunk of x
                                                            (x zero-padded to a multiple of r)
    mini     as default with D = [M M ... M]  M [r, mini_r] repeated out / mini_r times along the output
    bat      torch blocks W_ij [r, r] (out-block i, in-block j): ΔW_ij = W_ij B_i + B_i,  B [out / r, r, r]
             (weight-guided; the layer materialises W0 + ΔW0 inside the forward)

(Kang & Yin, 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (Bone),
arXiv:2409.15371; PEFT `tuners/miss`, `MissConfig(init_weights=True | "bat" | "mini")`.) The block starts at 0,
so every mode starts as the identity (`options={"init_weights": False}` is PEFT's `init_weights=False`: Kaiming-uniform D).
`bone` is the same adapter under Bone's old name (PEFT removed `BoneConfig`; its two modes are MiSS's default
and `bat`); both export as PEFT's MISS.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import _stack, base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, register_hf_format, static_field
from peft._quant import float_weight
from peft._vera import kernel_shape

MODES = ("default", "bat", "mini")


@register_hf_format
@adapter_node
class MiSS(Adapter):
  base: Any                              # [..., in, out] kernel or QuantizedWeight
  block: jax.Array                       # default [..., r, out]; mini [..., r, mini_r]; bat [..., out/r, r, r]
  mode: str = static_field(default="default")

  trainable_fields = ("block",)
  hf_peft_type = "MISS"

  @property
  def rank(self) -> int:
    return self.block.shape[-1] if self.mode == "bat" else self.block.shape[-2]

  def shared_block(self, n_out: int) -> jax.Array:
    """D [..., r, out] of the default and mini modes."""
    d = self.block
    return jnp.tile(d, (1,) * (d.ndim - 1) + (n_out // d.shape[-1],)) if self.mode == "mini" else d

  def delta(self) -> jax.Array:
    """ΔW0 [..., in, out] in float32."""
    w = float_weight(self.base, jnp.float32)
    n_in, n_out, r = w.shape[-2], w.shape[-1], self.rank
    if self.mode == "bat":
      b = self.block.astype(jnp.float32)
      wt = jnp.swapaxes(w, -1, -2).reshape(w.shape[:-2] + (n_out // r, r, n_in // r, r))   # [i, a, j, c]
      d4 = jnp.einsum("...iajc,...icb->...iajb", wt, b) + b[..., :, :, None, :]
      return jnp.swapaxes(d4.reshape(w.shape[:-2] + (n_out, n_in)), -1, -2)
    d = self.shared_block(n_out).astype(jnp.float32)
    reps = -(-n_in // r)
    return jnp.concatenate([d] * reps, axis=-2)[..., :n_in, :]

  def dot(self, x):
    if self.mode == "bat":          # weight-guided: the update depends on W0, so build the layer's weight
      return jnp.einsum("...i,io->...o", x, self.materialize().astype(x.dtype))
    n_in = x.shape[-1]
    r = self.rank
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n_in % r)])
    chunks = xp.reshape(x.shape[:-1] + (xp.shape[-1] // r, r)).sum(-2)
    d = self.shared_block(kernel_shape(self.base)[-1]).astype(x.dtype)
    return dot(x, self.base) + jnp.einsum("...r,ro->...o", chunks, d)

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(base_dtype(self.base))

  # ---- HF PEFT format (peft/_export.py) ---------------------------------------------------------------
  hf_tensor_names = ("miss_block",)

  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  def hf_tensors(self):
    return {"miss_block": np.asarray(self.block)}   # PEFT's layouts are ours: [r, out], [r, mini_r], [out/r, r, r]

  @classmethod
  def hf_config(cls, nodes, spec):
    modes = {n.mode for n in nodes.values()}
    ranks = {n.rank for n in nodes.values()}
    if len(modes) > 1 or len(ranks) > 1:
      raise ValueError(f"one r and one mode per PEFT MiSS adapter, got r={sorted(ranks)}, modes={sorted(modes)}")
    mode = modes.pop()
    mini_r = {n.block.shape[-1] for n in nodes.values()} if mode == "mini" else {1}
    if len(mini_r) > 1:
      raise ValueError(f"one mini_r per PEFT MiSS adapter, got {sorted(mini_r)}")
    return {"peft_type": "MISS", "r": ranks.pop(), "mini_r": mini_r.pop(), "miss_dropout": 0.0,
            "init_weights": {"default": True, "bat": "bat", "mini": "mini"}[mode], "bias": "none"}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked):
    mode = config.get("init_weights", True)
    mode = mode if mode in ("bat", "mini") else "default"
    return cls(base, _stack([l["miss_block"] for l in layers], stacked), mode=mode)


def make_miss(base, spec: AdapterSpec, rng, path: str) -> MiSS:
  """spec.rank = r (PEFT's default is 64); spec.options: `mode` (default | bat | mini), `mini_r` (mini mode;
  PEFT's default 1), `init_weights` (True: block = 0; False: random). alpha, init and dropout do not apply."""
  mode = spec.options.get("mode", "default")
  if mode not in MODES:
    raise ValueError(f"miss mode {mode!r}; valid: {', '.join(MODES)}")
  if spec.init != "default":
    raise ValueError(f"miss has no init {spec.init!r}; use options.init_weights (True: zero block, False: random)")
  if spec.dropout:
    raise ValueError("miss: dropout is not supported; use dropout=0")
  shape = kernel_shape(base)
  lead, (n_in, n_out), r = shape[:-2], shape[-2:], spec.rank
  if r > n_in:
    raise ValueError(f"{path}: miss rank {r} > in features {n_in}")
  if mode == "bat":
    if n_in % r or n_out % r:
      raise ValueError(f"{path}: miss mode bat needs in ({n_in}) and out ({n_out}) divisible by r={r}")
    block_shape = (n_out // r, r, r)
  elif mode == "mini":
    mini_r = int(spec.options.get("mini_r", 1))
    if n_out % mini_r:
      raise ValueError(f"{path}: miss mode mini needs out ({n_out}) divisible by mini_r={mini_r}")
    block_shape = (r, mini_r)
  else:
    block_shape = (r, n_out)
  if not spec.options.get("init_weights", True):     # torch kaiming_uniform_(a=sqrt(5)) on PEFT's [r, out]: bound 1/sqrt(out)
    block = jax.random.uniform(rng, lead + block_shape, jnp.float32, -1.0, 1.0) / math.sqrt(block_shape[-1])
  else:
    block = jnp.zeros(lead + block_shape, jnp.float32)
  return MiSS(base, block.astype(spec.dtype), mode=mode)


register_adapter("miss")(make_miss)
register_adapter("bone")(make_miss)    # Bone, MiSS's former name
