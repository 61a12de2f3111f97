"""Quantised frozen bases (QLoRA): NF4 and int8 blockwise storage, dequantised inside the layer's dot.

A kernel W [..., in, out] is flattened per matrix, cut into blocks of `block_size` values, and each block b
is stored as codes plus one float32 absmax scale c_b = max|W_b|:

    nf4:   code_i = argmin_k |W_i / c_b - q_k|,   W^_i = c_b * q[code_i]     (two 4-bit codes per byte)
    int8:  code_i = round(127 * W_i / c_b),       W^_i = c_b * code_i / 127

q are the 16 NormalFloat levels of QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs", arXiv:2305.14314): quantiles of N(0, 1), 8 positive and 7 negative plus an exact zero, scaled to
[-1, 1] (bitsandbytes' `create_normal_map(offset=0.9677083)`). The rounding error of one value is at most
half the gap between the two levels around it times c_b (nf4: <= 0.139 c_b; int8: <= c_b / 254).

Memory per value: nf4 0.5 byte + 4 / block_size bytes of scale (0.5625 B at 64; float32 stores 4 B, bfloat16
2 B), int8 1.0625 B. Double quantisation of the scales (QLoRA's second level) is not implemented.

`QuantizedWeight` is an `Adapter` node without trainable parts, so it serves both as a frozen plain kernel
(`peft.dot` dequantises it) and as the `base` of any adapter (LoRA's `dot(x, base)` dispatches to it).
Blocks run along the flattened [in, out] matrix (row-major), so they differ from bitsandbytes' blocks of the
torch [out, in] weight; a quantised model is exported merged (dequantised), never as packed codes.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._node import adapter_node, static_field
from peft._core import Adapter, is_adapter, map_with_path

# bitsandbytes' NF4 table (float32 values of the normal-quantile construction above).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

KINDS = ("nf4", "int8")


@adapter_node
class QuantizedWeight(Adapter):
  """A frozen kernel [..., in, out] stored blockwise-quantised; leading (layer) axes stay leading axes of
  `codes` and `scales`, so `lax.scan` over stacked layers slices it like a plain kernel."""
  codes: jax.Array                  # [..., nblocks, block] int8, or [..., nblocks, block/2] uint8 (nf4)
  scales: jax.Array                 # [..., nblocks] float32 absmax per block
  kind: str = static_field(default="nf4")
  shape: tuple[int, int] = static_field(default=(0, 0))   # (in, out) of one matrix
  dtype: str = static_field(default="float32")            # the original dtype, restored by `materialize`

  def dequantize(self, dtype=None) -> jax.Array:
    lead = self.codes.shape[:-2]
    if self.kind == "nf4":
      hi, lo = self.codes >> 4, self.codes & 0xF
      idx = jnp.stack([hi, lo], axis=-1).reshape(self.codes.shape[:-1] + (-1,))
      vals = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    else:
      vals = self.codes.astype(jnp.float32) / 127.0
    w = (vals * self.scales[..., None]).reshape(lead + (-1,))
    n = self.shape[0] * self.shape[1]
    return w[..., :n].reshape(lead + tuple(self.shape)).astype(dtype or self.dtype)

  def dot(self, x):
    return jnp.einsum("...i,io->...o", x, self.dequantize(x.dtype))

  def materialize(self):
    return self.dequantize()

  def frozen_base(self):
    return self   # the reference model keeps the quantised storage


@functools.partial(jax.jit, static_argnames=("kind", "block_size"))
def _quantize_matrix(w: jax.Array, kind: str, block_size: int) -> tuple[jax.Array, jax.Array]:
  """One [in, out] matrix -> (codes [nblocks, ...], scales [nblocks])."""
  n = w.size
  nblocks = math.ceil(n / block_size)
  flat = jnp.pad(w.astype(jnp.float32).reshape(n), (0, nblocks * block_size - n))
  blocks = flat.reshape(nblocks, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None]
  if kind == "nf4":
    # Nearest level = the number of midpoints below (a tie goes to the lower level, as argmin would).
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    idx = jnp.searchsorted(jnp.asarray(mids), normed, side="left").astype(jnp.uint8)
    pairs = idx.reshape(nblocks, block_size // 2, 2)
    codes = (pairs[..., 0] << 4) | pairs[..., 1]
  else:
    codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8)
  return codes, absmax


def quantize_array(w: jax.Array, kind: str = "nf4", block_size: int = 64) -> QuantizedWeight:
  """w [..., in, out] -> QuantizedWeight, one matrix at a time (temporaries of one matrix, not the stack)."""
  if kind not in KINDS:
    raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(KINDS)}")
  if w.ndim < 2:
    raise ValueError(f"quantization needs a [..., in, out] kernel, got shape {w.shape}")
  if block_size <= 0 or (kind == "nf4" and block_size % 2):
    raise ValueError(f"quant_block_size={block_size} must be positive (and even for nf4)")
  lead, shape = w.shape[:-2], tuple(int(d) for d in w.shape[-2:])
  mats = jnp.reshape(w, (-1,) + shape)
  parts = [_quantize_matrix(mats[i], kind, block_size) for i in range(mats.shape[0])]
  codes = jnp.stack([c for c, _ in parts]).reshape(lead + parts[0][0].shape)
  scales = jnp.stack([s for _, s in parts]).reshape(lead + parts[0][1].shape)
  return QuantizedWeight(codes, scales, kind=kind, shape=shape, dtype=str(w.dtype))


def float_weight(base, dtype=None) -> jax.Array:
  """The dense weight of a base that may be quantised."""
  if isinstance(base, QuantizedWeight):
    return base.dequantize(dtype or jnp.float32)
  return base if dtype is None else base.astype(dtype)


def like_base(base, w: jax.Array):
  """A new base holding w in the storage of `base` (re-quantised when base is quantised: QPiSSA's
  residual, for instance)."""
  if isinstance(base, QuantizedWeight):
    return quantize_array(w, base.kind, base.codes.shape[-1] * (2 if base.kind == "nf4" else 1))
  return w.astype(base.dtype)


def quantize_params(params, targets, kind: str = "nf4", block_size: int = 64):
  """Quantises the plain kernels, and the plain bases of adapter nodes, whose paths `targets` selects
  (a predicate on the '/' path of the kernel)."""
  def one(path, leaf):
    if not targets(path):
      return leaf
    if isinstance(leaf, QuantizedWeight):
      return leaf
    if is_adapter(leaf):
      base = leaf.base
      if isinstance(base, QuantizedWeight):
        return leaf
      return leaf.replace(base=quantize_array(base, kind, block_size))
    return quantize_array(leaf, kind, block_size)

  return map_with_path(one, params, is_leaf=is_adapter)


def nbytes(params: Any) -> int:
  """Bytes held by the real leaves of a parameter tree."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
