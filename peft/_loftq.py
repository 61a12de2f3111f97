"""LoftQ: a quantised base and LoRA factors that together approximate the float weight.

    A_0 B_0 = 0;   for t = 1 .. T:
      Q_t = quant(W - s A_{t-1} B_{t-1})
      W - deq(Q_t) = U S V^T;   A_t = U_r sqrt(S_r / s),   B_t = sqrt(S_r / s) V_r^T      (s A_t B_t = SVD_r)
    base <- Q_T (stored quantised),   y = x deq(Q_T) + s x A_T B_T  ~  x W

(Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv:2310.08659.)
As PEFT 0.21 (`utils/loftq_utils.py`, `loftq_init`; defaults `loftq_bits=4`, `loftq_iter=1`): the full SVD
split evenly (sqrt(S)) between the factors, the residual of the last quantisation factored, the last Q kept.
Our quantiser is peft/_quant.py's (NF4 levels of bitsandbytes, absmax blocks of `loftq_block_size` values
along our [in, out] matrix, no double quantisation; int8: the same blocks): PEFT calls bitsandbytes (NF4 blocks
of 64 along its [out, in] weight, `compress_statistics=False`; int8: one absmax per output row) and stores
deq(Q) in the float base, where we store Q itself. PEFT's factors ignore the LoRA scale (W ~ deq(Q) + L R,
while its forward adds s L R): equal when s = 1 (alpha = r), and `loftq_peft_scale=True` reproduces it.

LoftQ needs no data, but it must see the float weight and it replaces the frozen base, so it is a data init
with `quantizes_base=True`: `apply_config` leaves its targets out of `config.peft.quantize` (the other kernels
are quantised as usual), the trainer checkpoints the new frozen tree, and its adapter exports only with the
LoftQ base (`export_adapter(..., residual_ok=True)` and `models.save_hf(dir, cfg, peft.strip(params))`, which
writes deq(Q)): the original W is not W_res + s A_0 B_0, so PEFT's conversion to a LoRA on W is not exact.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from peft._core import is_adapter, map_with_path
from peft._corda import lora_nodes
from peft._data_init import Calibration, register_data_init
from peft._quant import QuantizedWeight, quantize_array

KIND_OF_BITS = {4: "nf4", 8: "int8"}


def loftq_factors(w, rank: int, scale: float, quantize: Callable, num_iter: int = 1):
  """(A [..., in, r], B [..., r, out], Q) for w [..., in, out]; `quantize(m) -> (Q, deq(Q) float32)`."""
  if num_iter <= 0:
    raise ValueError(f"loftq_iter must be positive, got {num_iter}")
  low = jnp.zeros_like(w)
  for _ in range(num_iter):
    q, wq = quantize(w - low)
    u, s, vt = jnp.linalg.svd(w - wq, full_matrices=False)
    sr = s[..., :rank] / scale
    a = u[..., :rank] * jnp.sqrt(sr)[..., None, :]
    b = jnp.sqrt(sr)[..., :, None] * vt[..., :rank, :]
    low = scale * a @ b
  return a, b, q


def our_quantizer(kind: str, block_size: int) -> Callable:
  def quantize(m):
    q = quantize_array(m, kind, block_size)
    return q, q.dequantize(jnp.float32)
  return quantize


def loftq_init(params, *, bits: int = 4, num_iter: int = 1, block_size: int = 64, peft_scale: bool = False):
  """LoRA nodes of `params` (float bases) -> LoftQ factors on quantised bases (nf4 for 4 bits, int8 for 8)."""
  if bits not in KIND_OF_BITS:
    raise ValueError(f"loftq_bits={bits}; valid: {', '.join(map(str, KIND_OF_BITS))}")
  nodes = lora_nodes(params, "LoftQ")
  quantize = our_quantizer(KIND_OF_BITS[bits], block_size)

  def put(path, node):
    if path not in nodes:
      return node
    if isinstance(node.base, QuantizedWeight):
      raise ValueError(f"{path}: LoftQ quantises the float weight itself; its base is already quantised "
                       "(quantise after LoftQ, or let apply_config do it: it leaves LoftQ's targets to LoftQ)")
    if min(node.base.shape[-2:]) < node.rank:
      raise ValueError(f"{path}: LoftQ needs r <= min(in, out), got r = {node.rank}")
    scale = 1.0 if peft_scale else node.scale
    fn = jax.jit(lambda w: loftq_factors(w, node.rank, scale, quantize, num_iter))
    a, b, q = fn(node.base.astype(jnp.float32))
    q = q.replace(dtype=str(node.base.dtype))
    return node.replace(a=a.astype(node.a.dtype), b=b.astype(node.b.dtype), base=q)

  return map_with_path(put, params, is_leaf=is_adapter)


@register_data_init("loftq", defaults=dict(loftq_bits=4, loftq_iter=1, loftq_block_size=64,
                                           loftq_peft_scale=False), quantizes_base=True)
def loftq_from_calibration(params, calib: Calibration, opts: dict):
  """The `data_init` entry: weight-only, the calibration batches are not read."""
  del calib
  return loftq_init(params, bits=int(opts["loftq_bits"]), num_iter=int(opts["loftq_iter"]),
                    block_size=int(opts["loftq_block_size"]), peft_scale=bool(opts["loftq_peft_scale"]))
