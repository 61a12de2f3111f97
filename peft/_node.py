"""What an adapter node is and how a method registers: `adapter_node`, `static_field`, `AdapterSpec`,
`register_adapter`, `register_hf_format`. The adapter files import this module only, so the package has no
import cycle (`_apply` imports the adapters, never the other way round).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from peft._core import Adapter

AdapterFactory = Callable[..., Adapter]
_ADAPTERS: dict[str, AdapterFactory] = {}


# ---------------------------------------------------------------------------------------------------
# Node helpers
# ---------------------------------------------------------------------------------------------------
def static_field(**kw):
  """A field that is tree structure (rank, scale, dropout rate...), not a leaf."""
  return flax.struct.field(pytree_node=False, **kw)


def adapter_node(cls):
  """`flax.struct.dataclass` for adapter nodes.

  `peft.split` replaces every non-trainable field by None, static metadata included; metadata is tree
  structure rather than a value, so such a None is dropped here instead of stored (else the trainable and
  frozen trees would disagree on their structure).
  """
  cls = flax.struct.dataclass(cls)
  static = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("pytree_node", True)}

  def replace(self, **updates):
    return dataclasses.replace(self, **{k: v for k, v in updates.items() if not (k in static and v is None)})

  cls.replace = replace
  return cls


def options_with_defaults(method: str, defaults: dict, given) -> dict:
  """`config.peft.options` of a method over its defaults (None keeps the default); an unknown key raises."""
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{method}: unknown option(s) {unknown}; valid: {', '.join(defaults)}")
  return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def input_dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout of the adapter path's input; identity without a key (eval) or at rate 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Specs and the registry
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """What to put on a matched kernel. `options` holds method-specific settings (e.g. IA3's
  `feedforward`)."""
  method: str = "lora"
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  init: str = "default"
  use_rslora: bool = False          # s = alpha / sqrt(r) instead of alpha / r
  dtype: str = "float32"            # of the trainable parts (PEFT keeps adapters in float32)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def replace(self, **kw) -> "AdapterSpec":
    return dataclasses.replace(self, **kw)


def register_adapter(name: str):
  """Registers `fn(base, spec, rng, path) -> Adapter` under `name` (what `config.peft.method` names)."""
  def deco(fn):
    if name in _ADAPTERS:
      raise ValueError(f"adapter {name!r} registered twice")
    _ADAPTERS[name] = fn
    return fn
  return deco


def get_adapter(name: str) -> AdapterFactory:
  if name not in _ADAPTERS:
    raise ValueError(f"unknown adapter method {name!r}; valid: {', '.join(adapter_names())}")
  return _ADAPTERS[name]


def adapter_names() -> list[str]:
  return sorted(_ADAPTERS)


# HF PEFT formats: node classes that `export_adapter` / `import_adapter` can write and read. A class sets
# `hf_peft_type`, `hf_tensors(self)` (one unstacked node -> {suffix: torch-layout array}),
# `hf_config(cls, nodes, spec)` (the adapter_config.json fields) and `from_hf(cls, base, layers, config,
# module)`, plus `hf_accepts(cls, config)` to choose between classes of one peft_type (LoRA vs DoRA), and
# `hf_tensor_names` (the per-module suffixes `from_hf` reads: `import_adapter` refuses any other tensor).
HF_FORMATS: dict[str, list[type]] = {}


def register_hf_format(cls):
  HF_FORMATS.setdefault(cls.hf_peft_type, []).append(cls)
  return cls
