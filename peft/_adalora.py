"""AdaLoRA: an SVD-form update whose rank budget is reallocated during training by importance.

    y = x W0 + s (drop(x) (Q^T Λ)) P^T,     ΔW = P Λ Q  (torch layout [out, in]),   s = alpha / (init_r + 1e-5)

with Q [init_r, in] (PEFT's lora_A; here `a = Q^T [in, r]`), Λ = diag(e) (lora_E; `e [r]`) and P [out, r]
(lora_B; `b = P^T [r, out]`). The orthogonality penalty, added to the loss through `Adapter.regularizer`,

    R = w / (2 n) sum_modules ( ||Q Q^T - I||_F + ||P^T P - I||_F ),   n = number of modules,

is PEFT's and the authors' code's (the Frobenius norm, not its square as the paper writes); w =
`orth_reg_weight`. The rank allocator (sensitivity and uncertainty EMAs, the cubic budget schedule, masking
Λ) is an optax transformation in `optim/_adalora.py`: Λ entries it prunes are set to zero after the step,
so every shape stays `init_r` and nothing recompiles when the budget moves. `s` keeps `init_r` whatever the
current rank, as PEFT's `ranknum`.

(Zhang et al., 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512; PEFT 0.21 `tuners/adalora`.) Init as PEFT: e = 0, a and b ~ N(0, 0.02^2).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import LowRankShape
from peft._node import (AdapterSpec, adapter_node, input_dropout, options_with_defaults, register_adapter,
                        register_hf_format, static_field)
from peft._quant import float_weight

# PEFT's AdaLoraConfig defaults (tuners/adalora/config.py); config.peft.options overrides them.
DEFAULTS = dict(init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5, total_step=None)


def adalora_options(given) -> dict:
  """`config.peft.options` of an AdaLoRA run over PEFT's defaults; an unknown key raises."""
  return options_with_defaults("adalora", DEFAULTS, given)


def options(spec: AdapterSpec) -> dict:
  return adalora_options(spec.options)


def orthogonality(a: jax.Array, b: jax.Array) -> tuple[jax.Array, int]:
  """(sum over modules of ||a^T a - I||_F + ||b b^T - I||_F, number of matrices); leading axes are modules."""
  r = a.shape[-1]
  eye = jnp.eye(r, dtype=jnp.float32)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  qq = jnp.einsum("...ir,...is->...rs", a, a) - eye
  pp = jnp.einsum("...ro,...so->...rs", b, b) - eye
  fro = lambda m: jnp.sqrt(jnp.sum(m * m, axis=(-2, -1)))
  return jnp.sum(fro(qq)) + jnp.sum(fro(pp)), 2 * int(np.prod(a.shape[:-2], dtype=np.int64))


@register_hf_format
@adapter_node
class AdaLoRA(LowRankShape, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                      # [..., in, r]  Q^T, right singular vectors
  e: jax.Array                      # [..., r]      Λ, singular values (pruned entries are zero)
  b: jax.Array                      # [..., r, out] P^T, left singular vectors
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (peft.with_dropout_rng)
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)
  orth_reg_weight: float = static_field(default=0.5)

  trainable_fields = ("a", "e", "b")
  hf_peft_type = "ADALORA"
  hf_tensor_names = ("lora_A", "lora_E", "lora_B")

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, (self.a * self.e[..., None, :]).astype(x.dtype))
    up = jnp.einsum("...r,ro->...o", low, self.b.astype(x.dtype))
    return dot(x, self.base) + up * self.scale

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """s Q^T Λ P^T [..., in, out]."""
    ae = self.a.astype(dtype) * self.e.astype(dtype)[..., None, :]
    return jnp.einsum("...ir,...ro->...io", ae, self.b.astype(dtype)) * self.scale

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(jnp.dtype(self.base.dtype))

  def regularizer(self):
    if not self.orth_reg_weight:
      return None
    total, n = orthogonality(self.a, self.b)
    return {"adalora_orth": (self.orth_reg_weight * total, n)}

  def ranks(self) -> jax.Array:
    """[...] current rank: the number of nonzero singular values."""
    return jnp.sum(self.e != 0, axis=-1)

  # ---- HF PEFT format (peft/_export.py): the full init_r tensors, pruned entries zero ----------------
  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  def hf_tensors(self) -> dict[str, np.ndarray]:
    return {"lora_A": np.asarray(self.a).T, "lora_E": np.asarray(self.e)[:, None],
            "lora_B": np.asarray(self.b).T}

  @classmethod
  def hf_config(cls, nodes: dict, spec: Optional[AdapterSpec]) -> dict:
    ranks = {n.rank for n in nodes.values()}
    if len(ranks) != 1:
      raise ValueError(f"AdaLoRA export needs one init_r for every module, got {sorted(ranks)}")
    r = ranks.pop()
    n = next(iter(nodes.values()))
    opts = options(spec) if spec is not None else dict(DEFAULTS)
    return {"peft_type": "ADALORA", "init_r": r, "target_r": opts["target_r"], "r": 8,
            "lora_alpha": n.scale * (r + 1e-5), "lora_dropout": n.dropout, "tinit": opts["tinit"],
            "tfinal": opts["tfinal"], "deltaT": opts["deltaT"], "beta1": opts["beta1"], "beta2": opts["beta2"],
            "orth_reg_weight": n.orth_reg_weight, "total_step": opts["total_step"] or 1,
            "rank_pattern": None, "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False}

  @classmethod
  def from_hf(cls, base, layers: list[dict], config, module: str, stacked: bool):
    def stack(xs):
      return jnp.asarray(np.stack(xs) if stacked else xs[0], jnp.float32)
    a = stack([l["lora_A"].T for l in layers])
    e = stack([l["lora_E"][:, 0] for l in layers])
    b = stack([l["lora_B"].T for l in layers])
    r = a.shape[-1]
    alpha = config.get("lora_alpha", 8)
    return cls(base, a, e, b, scale=float((alpha if alpha > 0 else r) / (r + 1e-5)),
               dropout=float(config.get("lora_dropout", 0.0)),
               orth_reg_weight=float(config.get("orth_reg_weight", 0.5)))


@register_adapter("adalora")
def make_adalora(base, spec: AdapterSpec, rng, path: str) -> AdaLoRA:
  """init_r comes from `options.init_r` (PEFT ignores `r` for AdaLoRA; so does this factory);
  s = alpha / (init_r + 1e-5), PEFT's scaling / ranknum."""
  del path
  opts = options(spec)
  r = int(opts["init_r"])
  w = float_weight(base, jnp.float32)
  lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
  ka, kb = jax.random.split(rng)
  a = 0.02 * jax.random.normal(ka, lead + (n_in, r), jnp.float32)
  b = 0.02 * jax.random.normal(kb, lead + (r, n_out), jnp.float32)
  e = jnp.zeros(lead + (r,), jnp.float32)
  alpha = spec.alpha if spec.alpha > 0 else float(r)
  return AdaLoRA(base, a.astype(spec.dtype), e.astype(spec.dtype), b.astype(spec.dtype),
                 scale=float(alpha / (r + 1e-5)), dropout=spec.dropout,
                 orth_reg_weight=float(opts["orth_reg_weight"]))
