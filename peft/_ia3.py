"""(IA)^3: learned per-unit rescaling of a frozen layer (the worked example of peft/ADDING_AN_ADAPTER.md).

    y = (x W0) * l          l [out]   (attention projections: keys, values...)
    y = (x * l) W0          l [in]    (feed-forward layers: `options.feedforward`, default down_proj)

(Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638.) l starts at 1, so the adapter starts as the identity; the merge is W0 scaled
along the matching axis. PEFT's `ia3_l` is [out, 1] or [1, in].

One difference from PEFT: on a layer with a bias, PEFT scales the output *including* the bias (and merges
the bias as b * l); `peft.dot` never sees the bias, so here only x W0 is scaled. Target bias-free layers (or
feed-forward ones, where both agree) when you need PEFT's numbers.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._node import AdapterSpec, adapter_node, register_adapter, register_hf_format, static_field
from peft._targets import target_regex
from peft._core import Adapter, dot
from peft._lora import _stack, base_dtype
from peft._quant import float_weight


@register_hf_format
@adapter_node
class IA3(Adapter):
  base: Any                       # [..., in, out] kernel or QuantizedWeight
  l: jax.Array                    # [..., out], or [..., in] when feedforward
  feedforward: bool = static_field(default=False)

  trainable_fields = ("l",)
  hf_peft_type = "IA3"

  def dot(self, x):
    l = self.l.astype(x.dtype)
    if self.feedforward:
      return dot(x * l, self.base)
    return dot(x, self.base) * l

  def materialize(self):
    w = float_weight(self.base, jnp.float32)
    l = self.l.astype(jnp.float32)
    w = w * (l[..., :, None] if self.feedforward else l[..., None, :])
    return w.astype(base_dtype(self.base))

  # ---- HF PEFT format ---------------------------------------------------------------------------------
  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  hf_tensor_names = ("ia3_l",)

  def hf_tensors(self):
    l = np.asarray(self.l)
    return {"ia3_l": l[None, :] if self.feedforward else l[:, None]}

  @classmethod
  def hf_config(cls, nodes, spec):
    del spec
    return {"peft_type": "IA3", "init_ia3_weights": True, "fan_in_fan_out": False,
            "feedforward_modules": sorted({m.split(".")[-1] for m, n in nodes.items() if n.feedforward})}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked):
    ff = config.get("feedforward_modules") or []
    ff = [ff] if isinstance(ff, str) else ff
    is_ff = any(module == f or module.endswith("." + f) for f in ff)
    return cls(base, _stack([l["ia3_l"].reshape(-1) for l in layers], stacked), feedforward=is_ff)


@register_adapter("ia3")
def make_ia3(base, spec: AdapterSpec, rng, path: str) -> IA3:
  """spec.options: `feedforward` (targets, default "down_proj") scale the input instead of the output.
  rank, alpha and init do not apply."""
  del rng
  if spec.init != "default":
    raise ValueError(f"ia3 has no init {spec.init!r}; its vectors start at 1")
  ff = spec.options.get("feedforward", "down_proj")
  ff = [t.strip() for t in ff.split(",")] if isinstance(ff, str) else list(ff)
  is_ff = any(re.fullmatch(target_regex(t), path) for t in ff)
  shape = base.shape if hasattr(base, "ndim") else base.codes.shape[:-2] + tuple(base.shape)
  n = shape[-2] if is_ff else shape[-1]
  return IA3(base, jnp.ones(tuple(shape[:-2]) + (n,), spec.dtype), feedforward=is_ff)
