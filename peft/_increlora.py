"""IncreLoRA: an SVD-form update whose rank grows, during training, in the modules that matter most.

    ΔW = alpha / (ranknum + 1e-5) · Q^T diag(e ⊙ m + 1e-5 · m_res) P^T,     y = x W0 + x ΔW

with a = Q^T [in, R], e [R], b = P^T [R, out] preallocated to a capacity R (`max_r`), m the mask of the ranks
in use (the first `init_r` at the start), m_res the `add_r` reserve ranks whose singular value is pinned at
1e-5 while their vectors already train ("advance learning"), and ranknum = sum(m). Every `incre_interval`
steps after `init_warmup`, a host hook (`optim/_increlora.py`) gives the `top_h` modules with the largest
score Ī·Ū their reserve ranks and opens `add_r` new reserves, until the model holds `target_r` ranks per
module on average; then the reserves close. Ī and Ū are the EMAs (beta1, beta2) of the module score

    S = sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(#ΔW),

the reference's backward hook on ΔW. Here ΔW is materialised in the forward (as the reference does) and
passes through an identity whose custom VJP writes S into the gradient of a zero scalar `probe` per module;
the optimizer wrapper turns probe gradients into the EMAs and never updates the probe. The masks and
ranknum are frozen arrays the hook rewrites, so growth never recompiles the step.

(Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", arXiv:2308.12043; FeiyuZhang98/IncreLoRA `loralib/loralib/increlora.py`.) Init as the
reference: e = 0, a and b ~ N(0, 0.02^2). Orthogonality penalty: ||Q_m Q_m^T - I|| + ||P_m^T P_m - I|| over
the live (used and reserve) ranks of each module, weight `orth_reg_weight` (0.1, its README), averaged over
matrices; the reference takes it per parameter chunk (one per added group of ranks).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import LowRankShape
from peft._node import (AdapterSpec, adapter_node, input_dropout, options_with_defaults, register_adapter,
                        static_field)
from peft._quant import float_weight

# The reference README's example (init_r = lora_r 1, target 2, top_h 2, warmup / interval 1000); add_r is
# its `rank_dic[target_r]` ({2: 1, 4: 2, 6: 3, 8: 4}) unless given; max_r (capacity) is ours.
INCRELORA_OPTIONS = dict(init_r=1, target_r=2, add_r=None, top_h=2, init_warmup=1000, incre_interval=1000,
                         beta1=0.85, beta2=0.85, advance_learn=True, max_r=None, orth_reg_weight=0.1)
RESERVE_E = 1e-5


def increlora_options(given) -> dict:
  o = options_with_defaults("increlora", INCRELORA_OPTIONS, given)
  if o["add_r"] is None:
    o["add_r"] = {2: 1, 4: 2, 6: 3, 8: 4}.get(int(o["target_r"]), max(int(o["target_r"]) // 2, 1))
  if o["max_r"] is None:
    o["max_r"] = 4 * int(o["target_r"]) + int(o["add_r"])
  if not int(o["init_r"]) + int(o["add_r"]) <= int(o["max_r"]):
    raise ValueError(f"increlora: max_r={o['max_r']} leaves no room for init_r + add_r")
  return o


@jax.custom_vjp
def probed(dw: jax.Array, probe: jax.Array) -> jax.Array:
  """dw; the cotangent of `probe` is sum|dw ⊙ g| / sqrt(#dw) (IncreLoRA's module score)."""
  del probe
  return dw


def _probed_fwd(dw, probe):
  return dw, (dw, probe)


def _probed_bwd(res, g):
  dw, probe = res
  score = jnp.sum(jnp.abs(dw.astype(jnp.float32) * g.astype(jnp.float32))) / math.sqrt(dw.size)
  return g, jnp.broadcast_to(score, probe.shape).astype(probe.dtype)


probed.defvjp(_probed_fwd, _probed_bwd)


@adapter_node
class IncreLoRA(LowRankShape, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                      # [..., in, R]  Q^T
  e: jax.Array                      # [..., R]      singular values
  b: jax.Array                      # [..., R, out] P^T
  probe: jax.Array                  # [...] zero; its gradient is the module score S
  used: jax.Array                   # [..., R] float 0/1: ranks in use (frozen; the hook grows it)
  reserve: jax.Array                # [..., R] float 0/1: reserve ranks (advance learning)
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (peft.with_dropout_rng)
  alpha: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)
  orth_reg_weight: float = static_field(default=0.1)

  trainable_fields = ("a", "e", "b", "probe")

  def singular_values(self) -> jax.Array:
    return self.e * self.used + RESERVE_E * self.reserve

  def delta(self, dtype=jnp.float32) -> jax.Array:
    ae = self.a.astype(dtype) * self.singular_values().astype(dtype)[..., None, :]
    s = self.alpha / (jnp.sum(self.used, -1) + 1e-5)
    return jnp.einsum("...ir,...ro->...io", ae, self.b.astype(dtype)) * s[..., None, None].astype(dtype)

  def dot(self, x):
    dw = probed(self.delta(x.dtype), self.probe)
    return dot(x, self.base) + jnp.einsum("...i,io->...o", input_dropout(x, self.dropout, self.rng), dw)

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(jnp.dtype(self.base.dtype))

  def regularizer(self):
    if not self.orth_reg_weight:
      return None
    live = jnp.clip(self.used + self.reserve, 0, 1)
    a = self.a.astype(jnp.float32) * live[..., None, :]
    b = self.b.astype(jnp.float32) * live[..., :, None]
    eye = live[..., :, None] * jnp.eye(self.rank, dtype=jnp.float32)
    fro = lambda m: jnp.sqrt(jnp.sum(m * m, axis=(-2, -1)))
    total = (jnp.sum(fro(jnp.einsum("...ir,...is->...rs", a, a) - eye)) +
             jnp.sum(fro(jnp.einsum("...ro,...so->...rs", b, b) - eye)))
    return {"increlora_orth": (self.orth_reg_weight * total, 2 * int(np.prod(self.lead_shape, dtype=np.int64)))}


@register_adapter("increlora")
def make_increlora(base, spec: AdapterSpec, rng, path: str) -> IncreLoRA:
  """Capacity `max_r`; options in INCRELORA_OPTIONS (`spec.rank` is not used; `init_r` is)."""
  del path
  o = increlora_options(spec.options)
  R, r0, add = int(o["max_r"]), int(o["init_r"]), int(o["add_r"])
  w = float_weight(base, jnp.float32)
  lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
  ka, kb = jax.random.split(rng)
  idx = jnp.arange(R)
  used = jnp.broadcast_to((idx < r0).astype(jnp.float32), lead + (R,))
  reserve = (idx >= r0) & (idx < r0 + add) if o["advance_learn"] else jnp.zeros(R, bool)
  dt = spec.dtype
  return IncreLoRA(base, (0.02 * jax.random.normal(ka, lead + (n_in, R))).astype(dt), jnp.zeros(lead + (R,), dt),
                   (0.02 * jax.random.normal(kb, lead + (R, n_out))).astype(dt), jnp.zeros(lead, jnp.float32),
                   used, jnp.broadcast_to(reserve.astype(jnp.float32), lead + (R,)),
                   alpha=float(spec.alpha if spec.alpha > 0 else r0), dropout=spec.dropout,
                   orth_reg_weight=float(o["orth_reg_weight"]))
