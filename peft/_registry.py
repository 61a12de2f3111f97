"""Registries by name: optimizers (optax transforms) that `train_lib.optim.make` builds from the config.

An optimizer factory takes the schedule and the `config.optim` ConfigDict and returns a complete
`optax.GradientTransformation` (learning rate included):

    @register_optimizer("adamw")
    def _adamw(learning_rate, cfg):
      return optax.adamw(learning_rate, b1=cfg.b1, ...)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import optax

OptimizerFactory = Callable[..., optax.GradientTransformation]
_OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str):
  def deco(fn):
    if name in _OPTIMIZERS:
      raise ValueError(f"optimizer {name!r} registered twice")
    _OPTIMIZERS[name] = fn
    return fn
  return deco


def get_optimizer(name: str) -> OptimizerFactory:
  if name not in _OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(_OPTIMIZERS))}")
  return _OPTIMIZERS[name]


def optimizer_names() -> list[str]:
  return sorted(_OPTIMIZERS)


@register_optimizer("adamw")
def _adamw(learning_rate, cfg):
  return optax.adamw(learning_rate, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                     weight_decay=cfg.get("weight_decay", 0.0))


@register_optimizer("adam")
def _adam(learning_rate, cfg):
  return optax.adam(learning_rate, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8))


@register_optimizer("sgd")
def _sgd(learning_rate, cfg):
  return optax.sgd(learning_rate, momentum=cfg.get("momentum", None) or None)


@register_optimizer("adafactor")
def _adafactor(learning_rate, cfg):
  return optax.adafactor(learning_rate, weight_decay_rate=cfg.get("weight_decay", None) or None)


def _path_mask(pattern: str):
  """A mask function: True on the leaves whose '/' path fully matches `pattern`."""
  import re
  from peft._core import map_with_path
  rx = re.compile(pattern)
  return lambda params: map_with_path(lambda p, x: rx.fullmatch(p) is not None, params)


# Projected optimizers. `cfg.projected` selects the projected kernels (GaLore's attn/mlp linears by
# default); every other leaf gets plain Adam inside the same transform.
_PROJECTED = r"layers/(attn|mlp)/.*_proj/kernel(/slots)?"


@register_optimizer("galore")
def _galore(learning_rate, cfg):
  from peft._galore import galore
  return galore(learning_rate, rank=cfg.get("rank", 128), update_proj_gap=cfg.get("update_proj_gap", 200),
                scale=cfg.get("scale", 1.0), proj_type=cfg.get("proj_type", "std"), b1=cfg.get("b1", 0.9),
                b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8), svd=cfg.get("svd", "full"),
                reset_on_refresh=cfg.get("reset_on_refresh", False), weight_decay=cfg.get("weight_decay", 0.0),
                mask=_path_mask(cfg.get("projected", _PROJECTED)))


@register_optimizer("fira")
def _fira(learning_rate, cfg):
  from peft._fira import fira
  return fira(learning_rate, rank=cfg.get("rank", 128), update_proj_gap=cfg.get("update_proj_gap", 200),
              scale=cfg.get("scale", 0.25), proj_type=cfg.get("proj_type", "std"), gamma=cfg.get("gamma", 1.01),
              b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
              weight_decay=cfg.get("weight_decay", 0.0), mask=_path_mask(cfg.get("projected", _PROJECTED)))


@register_optimizer("frugal")
def _frugal(learning_rate, cfg):
  from peft._frugal import frugal
  return frugal(learning_rate, density=cfg.get("density", 0.25), update_gap=cfg.get("update_gap", 200),
                subspace=cfg.get("subspace", "svd"), inactive_update_rule=cfg.get("inactive_update_rule", "sign_sgd"),
                inactive_lr_scale=cfg.get("inactive_lr_scale", 0.1), reset_statistics=cfg.get("reset_statistics", True),
                b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8), seed=cfg.get("seed", 0),
                weight_decay=cfg.get("weight_decay", 0.0), mask=_path_mask(cfg.get("projected", _PROJECTED)))


# Host hooks: work that must not sit in the jitted step (layer resampling, ...). A hook transforms the
# parameters once before they are split into trainable/frozen, and every `every` steps rewrites the train
# state and the frozen tree on the host, keeping every shape (so the step never recompiles). A hook that
# writes trained values into the frozen tree sets `mutates_frozen`, and the trainer checkpoints that tree.
class HostHook(NamedTuple):
  every: int
  init_params: Callable          # (params, rng) -> params
  refresh: Callable              # (step, state, frozen, tx) -> (state, frozen)
  mutates_frozen: bool = False


_HOOKS: dict[str, Callable[..., HostHook]] = {}


def register_hook(name: str):
  """Decorator for a factory `(config, model) -> HostHook`, picked by `config.sampling.method`."""
  def deco(fn):
    if name in _HOOKS:
      raise ValueError(f"host hook {name!r} registered twice")
    _HOOKS[name] = fn
    return fn
  return deco


def get_hook(name: str) -> Callable[..., HostHook]:
  if name not in _HOOKS:
    raise ValueError(f"unknown layer-sampling method {name!r}; valid: {', '.join(sorted(_HOOKS)) or 'none'}")
  return _HOOKS[name]


def hook_names() -> list[str]:
  return sorted(_HOOKS)


@register_optimizer("lora_pro")
def _lora_pro(learning_rate, cfg):
  from peft._lora_pro import lora_pro
  return lora_pro(learning_rate, optimizer=cfg.get("inner", "adam"), b1=cfg.get("b1", 0.9),
                  b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8), momentum=cfg.get("momentum", None) or None,
                  inverse_eps=cfg.get("inverse_eps", 1e-8), x_mode=cfg.get("x_mode", "sylvester"),
                  weight_decay=cfg.get("weight_decay", 0.0))
