"""The registry of data-driven initialisations: adapter inits that need calibration batches (EVA, LoRA-GA, ...).

    @peft.register_data_init("eva", defaults=dict(eva_rho=2.0, eva_tau=0.99), mutates_base=False)
    def eva(params, calib: peft.Calibration, opts: dict) -> params: ...

`config.peft.init=NAME` applies the adapter with the default factors first (a placeholder init of that name
is registered here), then the trainer's `data_init` host hook (train_lib/data_init.py) builds a
`Calibration` from the first `config.peft.data_init.batches` training batches and calls the function before
the trainable/frozen split. The function's options live in `config.peft.data_init`, generated from
`defaults` (their one home); name them with the method's prefix, since all inits share that section.
`mutates_base=True` declares that the init rewrites frozen weights (a residual base, a quantised base): the
trainer then checkpoints the frozen tree. An init that needs something else from the model adds it to
`Calibration` (one field, filled by the hook).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from peft import _init


class Calibration(NamedTuple):
  """What a data-driven init may use. Each batch is the run's model batch as its loss reads it (SFT rows
  [B, T], preference rows [B, K, T]) plus, with N = B or B K: `flat_inputs`, `flat_segment_ids` [N, T] (what
  `forward` reads) and `token_mask` [N, T] (real tokens with a loss weight at the position: EVA's tokens)."""
  batches: list[dict]
  forward: Callable[[Any, dict], Any]     # forward(params, batch): the model without its head (activations)
  loss_fn: Callable[[Any, dict], jax.Array]  # loss_fn(plain params, batch): the run's loss (gradients)
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class DataInit:
  fn: Callable[[Any, Calibration, dict], Any]
  defaults: dict
  mutates_base: bool


_DATA_INITS: dict[str, DataInit] = {}


def register_data_init(name: str, *, defaults: dict | None = None, mutates_base: bool = False):
  def deco(fn):
    if name in _DATA_INITS:
      raise ValueError(f"data-driven init {name!r} registered twice")
    _DATA_INITS[name] = DataInit(fn, dict(defaults or {}), mutates_base)
    _init.register_init(name)(_init.data_driven)  # so `config.peft.init=name` applies before calibration
    return fn
  return deco


def data_init_names() -> list[str]:
  return sorted(_DATA_INITS)


def is_data_init(name: str | None) -> bool:
  return (name or "") in _DATA_INITS


def get_data_init(name: str) -> DataInit:
  if name not in _DATA_INITS:
    raise ValueError(f"unknown data-driven init {name!r}; valid: {', '.join(data_init_names())}")
  return _DATA_INITS[name]


def data_init_defaults() -> dict:
  """`config.peft.data_init`: the number of calibration batches and every registered init's options."""
  out = {"batches": 8}
  for name in data_init_names():
    for k, v in _DATA_INITS[name].defaults.items():
      if k in out and out[k] != v:
        raise ValueError(f"data-driven init {name!r}: option {k!r} clashes with another init's default")
      out[k] = v
  return out
