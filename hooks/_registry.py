"""The host-hook registry. A hook is made per run by `factory(config, model) -> HostHook`.

A `HostHook` may
  * `init_params(params, rng) -> params`: transform the parameters once, before they are split into the
    trainable and frozen trees (layer sampling wraps the stacked layers in slot nodes; a data-driven adapter
    initialisation would go here);
  * `refresh(step, state, frozen, tx) -> (state, frozen)` or `(state, frozen, metrics)`: every `every` steps
    (step 0 included), before that step's batch, rewrite the train state and the frozen tree with every
    shape, dtype and sharding kept, so the jitted step never recompiles; `metrics` (a dict of scalars) is
    logged at that step;
  * `observe(step, state, frozen, batch) -> metrics`: every `every` steps, after the batch is fetched and
    before the step runs, measure something without changing anything (gradient entanglement).
A hook that writes trained values into the frozen tree sets `mutates_frozen`, and the trainer checkpoints
that tree. A hook whose later refreshes depend on host-side values it computed earlier (TempBalance's last
spectral fit) returns them from `state() -> dict` (JSON values); the trainer saves them with every
checkpoint and hands them to `load_state(dict)` on resume, so a resumed run refreshes as the uninterrupted
one. Hooks run in `order` (then registration order).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional


def _same_params(params, rng):
  del rng
  return params


class HostHook(NamedTuple):
  every: int = 0                                 # steps between refresh / observe calls; 0 = never
  init_params: Callable = _same_params           # (params, rng) -> params
  refresh: Optional[Callable] = None             # (step, state, frozen, tx) -> (state, frozen[, metrics])
  mutates_frozen: bool = False
  observe: Optional[Callable] = None             # (step, state, frozen, batch) -> metrics
  state: Optional[Callable] = None               # () -> dict of JSON values, saved with each checkpoint
  load_state: Optional[Callable] = None          # (dict) -> None, on resume, before the first refresh


class _Entry(NamedTuple):
  factory: Callable[..., HostHook]
  enabled: Callable[[Any], bool]
  order: int


_HOOKS: dict[str, _Entry] = {}


def register_hook(name: str, *, enabled: Callable[[Any], bool], order: int = 0):
  """Decorator for a factory `(config, model) -> HostHook`; the hook runs in every run whose config
  satisfies `enabled(config)`."""
  def deco(fn):
    if name in _HOOKS:
      raise ValueError(f"host hook {name!r} registered twice")
    _HOOKS[name] = _Entry(fn, enabled, order)
    return fn
  return deco


def get_hook(name: str) -> Callable[..., HostHook]:
  if name not in _HOOKS:
    raise ValueError(f"unknown host hook {name!r}; valid: {', '.join(sorted(_HOOKS)) or 'none'}")
  return _HOOKS[name].factory


def hook_names() -> list[str]:
  return sorted(_HOOKS)


def active_hooks(config, model) -> list[tuple[str, HostHook]]:
  """(name, hook) of every registered hook that `config` enables, in run order."""
  names = sorted((e.order, i, n) for i, (n, e) in enumerate(_HOOKS.items()) if e.enabled(config))
  return [(n, _HOOKS[n].factory(config, model)) for _, _, n in names]
