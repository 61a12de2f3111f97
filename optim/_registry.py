"""The optimizer registry: a name -> a factory of a complete `optax.GradientTransformation`.

    @register_optimizer("adamw")
    def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
      ...

A factory's keyword arguments are that optimizer's options, and their defaults are the only defaults: the
config section `config.optim.<name>` is generated from them (`default_config`), an unknown key fails naming
the valid ones, and nothing else holds a default for them. Options a config file cannot carry (a mask
function) come from a second function: `register_optimizer("galore", options_from=galore)` exposes the
options of `galore` itself, so the registered wrapper only turns config values (a path regex) into what
`galore` takes (a mask).

A factory that wraps other registered optimizers takes a keyword-only `build` argument: `build(name)`
returns that optimizer made from its own config section (HFT's inner optimizer).
"""
from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any, Callable, Mapping, Optional

import ml_collections
import optax

from peft import map_with_path

OptimizerFactory = Callable[..., optax.GradientTransformation]
_OPTIMIZERS: dict[str, OptimizerFactory] = {}
_OPTION_SOURCES: dict[str, tuple[Callable, ...]] = {}
# Arguments that are never options: the learning rate (the schedule), masks (functions), `build`.
_NOT_OPTIONS = ("learning_rate", "mask", "weight_decay_mask", "build")


def register_optimizer(name: str, *, options_from: Optional[Callable] = None):
  """Registers `fn(learning_rate, **options) -> GradientTransformation` under `name`."""
  def deco(fn):
    if name in _OPTIMIZERS:
      raise ValueError(f"optimizer {name!r} registered twice")
    _OPTIMIZERS[name] = fn
    _OPTION_SOURCES[name] = (fn,) if options_from is None else (fn, options_from)
    return fn
  return deco


# What an adapter method needs from the optimizer (AdaLoRA's rank allocator, SoRA's proximal gate step):
# `fn(config, trainable, tx) -> tx` wraps the run's optimizer when `config.peft.method` is that method.
_ADAPTER_TRANSFORMS: dict[str, Callable] = {}


def register_adapter_transform(method: str):
  def deco(fn):
    if method in _ADAPTER_TRANSFORMS:
      raise ValueError(f"adapter transform for {method!r} registered twice")
    _ADAPTER_TRANSFORMS[method] = fn
    return fn
  return deco


def adapter_transform(config, trainable, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` wrapped by the transform `config.peft.method` registered, if any."""
  method = (config.get("peft") or {}).get("method")
  fn = _ADAPTER_TRANSFORMS.get(method)
  return tx if fn is None else fn(config, trainable, tx)


def get_optimizer(name: str) -> OptimizerFactory:
  if name not in _OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(_OPTIMIZERS))}")
  return _OPTIMIZERS[name]


def optimizer_names() -> list[str]:
  return sorted(_OPTIMIZERS)


def _unwrap_optional(tp):
  """Optional[X] / X | None -> X."""
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def options(name: str) -> dict[str, tuple[Any, Any]]:
  """{option: (default, type)} of a registered optimizer, in signature order."""
  get_optimizer(name)
  out = {}
  for fn in _OPTION_SOURCES[name]:
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
      if p.name in _NOT_OPTIONS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is p.empty:
        continue
      tp = _unwrap_optional(hints.get(p.name, type(p.default)))
      out.setdefault(p.name, (p.default, tp if isinstance(tp, type) else type(p.default)))
  return out


def default_config(name: str) -> ml_collections.ConfigDict:
  """`config.optim.<name>`: every option of the optimizer with its default (None defaults stay typed
  placeholders, so `--config.optim.<name>.<option>=...` works for them too)."""
  c = ml_collections.ConfigDict()
  for key, (default, tp) in options(name).items():
    c[key] = ml_collections.config_dict.placeholder(tp) if default is None else default
  return c


def check_options(name: str, given) -> None:
  """Raises on a key of `config.optim.<name>` that is not an option of that optimizer."""
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
  valid = options(name)
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ValueError(f"config.optim.{name}: unknown option(s) {unknown}; valid: {', '.join(valid)}")


def build(name: str, learning_rate: optax.ScalarOrSchedule, sections: Mapping) -> optax.GradientTransformation:
  """The optimizer `name` with the options of `sections[name]` (missing keys keep their defaults)."""
  fn = get_optimizer(name)
  given = sections.get(name) or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  check_options(name, given)
  valid = options(name)
  kwargs = {k: v for k, v in given.items() if v is not None or valid[k][0] is None}
  if "build" in inspect.signature(fn).parameters:
    kwargs["build"] = lambda inner: build(inner, learning_rate, sections)
  return fn(learning_rate, **kwargs)


def path_mask(pattern: str) -> Callable:
  """A mask function: True on the leaves whose '/' path fully matches `pattern`."""
  rx = re.compile(pattern)
  return lambda params: map_with_path(lambda p, x: rx.fullmatch(p) is not None, params)


# The leaves the projected optimizers project by default: the attention and MLP kernels (GaLore's
# `target_modules = ["attn", "mlp"]`), also as layer-sampling slots. Every other leaf gets plain Adam.
PROJECTED = r"layers/(attn|mlp)/.*_proj/kernel(/slots)?"


# ---------------------------------------------------------------------------------------------------
# The plain optax optimizers (our own defaults: optax.adamw decays by 1e-4 unless told otherwise).
# ---------------------------------------------------------------------------------------------------
@register_optimizer("adamw")
def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


@register_optimizer("adam")
def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


@register_optimizer("sgd")
def sgd(learning_rate, momentum: Optional[float] = None):
  return optax.sgd(learning_rate, momentum=momentum or None)


@register_optimizer("adafactor")
def adafactor(learning_rate, weight_decay: Optional[float] = None):
  return optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None)
