"""LoRA and rsLoRA: a frozen kernel plus a trainable low-rank update, never merged in the forward pass.

    y = x W0 + s ((drop(x) A) B + c),     A [in, r], B [r, out],   s = alpha / r   (rsLoRA: alpha / sqrt(r))

with c [out] the optional bias of B (PEFT's `LoraConfig(lora_bias=True)`, `options={"lora_bias": True}`
here; zero at init, trained, scaled with the rest of the branch as PEFT's `lora_B(lora_A(x)) * scaling`).
Without it (the default, as PEFT) c = 0. A biased adapter cannot be merged into a bias-free kernel
(`materialize` raises, as PEFT's merge does when the base layer has no bias); export it as an adapter.

(Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685; Kalajdzievski,
2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.) PEFT's lora_A
[r, in] and lora_B [out, r] are A^T and B^T. The base may be a plain kernel or a `QuantizedWeight`
(QLoRA): `peft.dot(x, base)` dequantises it inside the layer. The merge W0 + s A B happens only in
`materialize` (`peft.merge`, HF export).

Stacked layers: a node for `layers/.../kernel [L, in, out]` holds a [L, in, r], b [L, r, out] and the model's
`lax.scan` slices every leaf, so `dot` sees 2-D factors.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._node import (AdapterSpec, adapter_node, input_dropout, register_adapter, register_hf_format,
                         static_field)
from peft._core import Adapter, dot
from peft._init import init_factors
from peft._quant import float_weight, like_base


def base_dtype(base) -> jnp.dtype:
  return jnp.dtype(base.dtype)


def _pattern_value(pattern: dict, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in '.key'."""
  for key, v in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return v
  return default


class LowRankShape:
  """What every node holding a down-projection `a [..., in, r]` shares: its leading (layer) axes and rank."""

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return self.a.shape[:-2]

  @property
  def rank(self) -> int:
    return self.a.shape[-1]


class LowRankFactors(LowRankShape):
  """What the nodes holding `a [..., in, r]`, `b [..., r, out]` and a static `scale` share (LoRA, DoRA)."""

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """s A B [..., in, out]."""
    return self.scale * jnp.einsum("...ir,...ro->...io", self.a.astype(dtype), self.b.astype(dtype))


@register_hf_format
@adapter_node
class LoRA(LowRankFactors, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                      # [..., in, r]
  b: jax.Array                      # [..., r, out]
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys for this step (with_dropout_rng); None: no dropout
  bias: Optional[jax.Array] = None  # [..., out] PEFT's lora_B.bias (lora_bias=True); None: no bias
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)

  trainable_fields = ("a", "b", "bias")
  hf_peft_type = "LORA"

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, self.a.astype(x.dtype))
    up = jnp.einsum("...r,ro->...o", low, self.b.astype(x.dtype))
    if self.bias is not None:
      up = up + self.bias.astype(x.dtype)
    return dot(x, self.base) + self.scale * up

  def materialize(self):
    if self.bias is not None:
      raise ValueError("a LoRA adapter with lora_bias cannot be merged into a bias-free kernel (PEFT refuses "
                       "the same merge); export it as an adapter (peft.export_adapter)")
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(base_dtype(self.base))

  # ---- HF PEFT format (peft/_export.py) ---------------------------------------------------------------
  @classmethod
  def hf_accepts(cls, config) -> bool:
    return not config.get("use_dora", False) and not config.get("kasa_config")   # KaSA: peft/_kasa.py

  def hf_tensors(self) -> dict[str, np.ndarray]:
    out = {"lora_A.weight": np.asarray(self.a).T, "lora_B.weight": np.asarray(self.b).T}
    if self.bias is not None:
      out["lora_B.bias"] = np.asarray(self.bias)
    return out

  @classmethod
  def hf_config(cls, nodes: dict, spec: Optional[AdapterSpec]) -> dict:
    """r, lora_alpha (with rank_pattern / alpha_pattern for modules that differ) so that PEFT's scale
    alpha / r (or / sqrt(r)) equals each node's."""
    rslora = bool(spec.use_rslora) if spec is not None else False
    ranks = {m: n.rank for m, n in nodes.items()}
    alphas = {m: n.scale * (math.sqrt(n.rank) if rslora else n.rank) for m, n in nodes.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    dropouts = {n.dropout for n in nodes.values()}
    biased = {getattr(n, "bias", None) is not None for n in nodes.values()}
    if len(biased) > 1:
      raise ValueError("PEFT's lora_bias is one switch for the whole adapter: every module has a LoRA bias "
                       "or none does")
    return {"peft_type": "LORA", "lora_bias": biased.pop(), "r": r, "lora_alpha": alpha, "use_rslora": rslora,
            "use_dora": False, "lora_dropout": max(dropouts), "init_lora_weights": True,
            "bias": "none", "fan_in_fan_out": False,
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}}

  @classmethod
  def hf_scale(cls, config, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if config.get("use_rslora", False) else r)

  hf_tensor_names = ("lora_A.weight", "lora_B.weight", "lora_B.bias")

  @classmethod
  def from_hf(cls, base, layers: list[dict], config, module: str, stacked: bool):
    a = _stack([l["lora_A.weight"].T for l in layers], stacked)
    b = _stack([l["lora_B.weight"].T for l in layers], stacked)
    has_bias = ["lora_B.bias" in l for l in layers]
    if any(has_bias) != bool(config.get("lora_bias", False)) or len(set(has_bias)) > 1:
      raise ValueError(f"{module}: lora_B.bias in {sum(has_bias)} of {len(layers)} layers with "
                       f"lora_bias={config.get('lora_bias', False)} in the config")
    bias = _stack([l["lora_B.bias"] for l in layers], stacked) if any(has_bias) else None
    return cls(base, a, b, bias=bias, scale=cls.hf_scale(config, module, a.shape[-1]),
               dropout=float(config.get("lora_dropout", 0.0)))


def _stack(xs, stacked: bool) -> jax.Array:
  return jnp.asarray(np.stack(xs) if stacked else xs[0], jnp.float32)


@register_adapter("lora")
def make_lora(base, spec: AdapterSpec, rng, path: str) -> LoRA:
  del path
  a, b, res = init_factors(spec.init, float_weight(base, jnp.float32), spec.rank, spec.scale, rng)
  if res is not None:
    base = like_base(base, res)
  bias = None
  if spec.options.get("lora_bias", False):   # PEFT initialises lora_B.bias to zero
    bias = jnp.zeros(b.shape[:-2] + b.shape[-1:], spec.dtype)
  return LoRA(base, a.astype(spec.dtype), b.astype(spec.dtype), bias=bias, scale=spec.scale,
              dropout=spec.dropout)
