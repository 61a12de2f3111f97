"""Registries by name: optimizers (optax transforms) that `train_lib.optim.make` builds from the config.

An optimizer factory takes the schedule and the `config.optim` ConfigDict and returns a complete
`optax.GradientTransformation` (learning rate included):

    @register_optimizer("adamw")
    def _adamw(learning_rate, cfg):
      return optax.adamw(learning_rate, b1=cfg.b1, ...)
"""
from __future__ import annotations

from typing import Callable

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
