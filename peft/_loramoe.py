r"""LoRAMoE: LoRA experts mixed by a dense router, with the localized balancing constraint.

Dou et al., 2024, *LoRAMoE: Alleviating World Knowledge Forgetting in Large Language Models via MoE-Style
Plugin* (arXiv 2312.09979); reference `Ablustrund/LoRAMoE: peft/tuners/lora.py` (class `Linear`). Per token
x of a frozen layer W0 (the reference puts it on the FFN: gate, up and down projections):

.. math::

  \omega(x) = \mathrm{softmax}(x W_r) \in \mathbb{R}^E, \qquad
  y = x W_0 + s \sum_{e=1}^{E} \omega_e(x)\, (x A_e) B_e, \qquad s = \alpha / r

with A_e [in, r], B_e [r, out], W_r [in, E] trained (B_e = 0 at init: the adapter starts as the identity;
A_e and W_r Kaiming-uniform, bound 1/sqrt(in), as torch's default Linear init the reference calls).

**Localized balancing constraint.** The experts are split into two halves: the first for the downstream
task, the second for world knowledge. Per sequence n the importance of expert e is
Q[n, e] = Σ_t ω_e(x_t) (over every position, padding included, as the reference). With the coefficient
I[n, e] = 1 + δ when expert e's half matches the sequence's type (`batch["task_types"]`: 1 = downstream
task, 0 = world knowledge; all 1 when the batch has none) and 1 − δ otherwise, Z = I ∘ Q and

.. math::

  L_{lbc} = \frac{\mathrm{Var}(Z)}{\mathrm{mean}(Z)^2 + 10^{-10}}

(the squared coefficient of variation over all N x E entries, unbiased variance as torch's `var`), per
adapted module, summed over modules and layers. `dot` sows Z for both possible types (`losses.sow`), the
term `loramoe_blc` picks per sequence by the batch's types, and the trainer adds
`config.loss.aux_weights.loramoe_blc * L_lbc` (default 0.1) to the loss, logged as `aux/loramoe_blc`.

The reference's `run_loramoe.sh` runs 8 experts (`options.num_experts`, our default), rank 4 and alpha 32
(`config.peft.rank` / `alpha`, whose shared defaults are 8 / 8) on gate_proj/up_proj/down_proj. `blc_alpha` (δ) defaults to 0.1 and the weight β to 0.1, our choice (the
script ships both at 0, which turns the constraint off: set `options.blc_alpha=0` and
`config.loss.aux_weights.loramoe_blc=0` for it). The routing depends on the input, so a LoRAMoE layer
cannot be merged into one weight (`materialize` raises).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

import losses
from peft._core import Adapter, dot
from peft._node import AdapterSpec, adapter_node, register_adapter, static_field

AUX_NAME = "loramoe_blc"


@adapter_node
class LoRAMoE(Adapter):
  base: Any              # [..., in, out] kernel or QuantizedWeight
  router: jax.Array      # [..., in, E]
  a: jax.Array           # [..., E, in, r]
  b: jax.Array           # [..., E, r, out]
  scale: float = static_field(default=1.0)
  blc_alpha: float = static_field(default=0.1)

  trainable_fields = ("router", "a", "b")

  @property
  def num_experts(self) -> int:
    return self.router.shape[-1]

  def routing(self, x):
    """omega(x) [..., E] in float32 (the reference's softmax dtype)."""
    return jax.nn.softmax(jnp.einsum("...i,ie->...e", x, self.router.astype(x.dtype)).astype(jnp.float32), -1)

  def dot(self, x):
    w = self.routing(x)
    low = jnp.einsum("...i,eir->...er", x, self.a.astype(x.dtype))
    up = jnp.einsum("...er,ero->...eo", low, self.b.astype(x.dtype))
    y = dot(x, self.base) + self.scale * jnp.einsum("...e,...eo->...o", w.astype(x.dtype), up)
    losses.sow(AUX_NAME, balance_inputs(w, self.blc_alpha))
    return y

  def materialize(self):
    raise ValueError("LoRAMoE's experts are mixed per token by its router: the layer has no single merged "
                     "weight; keep the adapter (or strip it for the base model)")


def balance_inputs(w: jax.Array, delta: float) -> jax.Array:
  """[2, N, E]: Z = I ∘ Q for sequences of type 0 (index 0) and type 1 (index 1), from routing weights
  w [N, T, E] (a [T, E] input is one sequence)."""
  q = (w if w.ndim >= 3 else w[None]).sum(-2)
  q = q.reshape(-1, q.shape[-1])
  e = q.shape[-1]
  first = jnp.arange(e) < e // 2
  coef_task = jnp.where(first, 1.0 + delta, 1.0 - delta)        # type 1: the first half is "its" half
  return jnp.stack([q * coef_task[::-1], q * coef_task])


def cv_squared(z: jax.Array) -> jax.Array:
  """Var(z) / (mean(z)^2 + 1e-10) over all entries (unbiased variance; 0 for a single entry)."""
  z = z.reshape(-1).astype(jnp.float32)
  if z.shape[0] == 1:
    return jnp.zeros((), jnp.float32)
  return jnp.var(z, ddof=1) / (jnp.mean(z) ** 2 + 1e-10)


@losses.register_aux(AUX_NAME, weight=0.1)
def localized_balancing_loss(values: jax.Array, batch: Mapping[str, Any], cfg) -> jax.Array:
  """Sum over modules (leading axes) of cv^2(Z), Z picked per sequence by `batch["task_types"]`."""
  del cfg
  *lead, two, n, e = values.shape
  types = batch.get("task_types")
  if types is None:
    types = jnp.ones((n,), jnp.int32)
  else:
    types = jnp.asarray(types).reshape(-1)
    if types.shape[0] != n:     # one type per example, K sequences each ([B, K, T] batches)
      types = jnp.repeat(types, n // types.shape[0])
  flat = values.reshape(-1, two, n, e)
  z = jnp.where((types == 1)[None, :, None], flat[:, 1], flat[:, 0])
  return jax.vmap(cv_squared)(z).sum()


def _kaiming_uniform(rng, shape, fan_in, dtype):
  bound = 1.0 / math.sqrt(fan_in)   # kaiming_uniform_(a=sqrt(5)), torch's Linear default
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)


@register_adapter("loramoe")
def make_loramoe(base, spec: AdapterSpec, rng, path: str) -> LoRAMoE:
  """spec.rank, spec.alpha (s = alpha / r); options: `num_experts` (8, even), `blc_alpha` (delta, 0.1)."""
  del path
  n_exp = int(spec.options.get("num_experts", 8))
  if n_exp < 2 or n_exp % 2:
    raise ValueError(f"loramoe: num_experts must be even and >= 2 (two halves), got {n_exp}")
  if spec.init != "default":
    raise ValueError(f"loramoe has no init {spec.init!r}")
  shape = tuple(base.shape) if hasattr(base, "ndim") else tuple(base.codes.shape[:-2]) + tuple(base.shape)
  lead, (din, dout) = shape[:-2], shape[-2:]
  k_r, k_a = jax.random.split(rng)
  router = _kaiming_uniform(k_r, lead + (din, n_exp), din, spec.dtype)
  a = _kaiming_uniform(k_a, lead + (n_exp, din, spec.rank), din, spec.dtype)
  b = jnp.zeros(lead + (n_exp, spec.rank, dout), spec.dtype)
  return LoRAMoE(base, router, a, b, scale=spec.scale, blc_alpha=float(spec.options.get("blc_alpha", 0.1)))
