"""Auxiliary loss terms that parts of the model emit from inside the forward pass (LoRAMoE's balancing loss).

    losses.sow("loramoe_blc", value)                  # anywhere in the forward, under jit / scan / remat
    with losses.collecting() as sown:                  # the trainer, around the policy's forward pass
      policy = losses.model_outputs(model, params, batch, needs)
    loss, metrics = losses.add_aux_losses(loss, metrics, sown, batch, config.loss)

`add_aux_losses` adds `config.loss.aux_weights[name] * term` for every term sown in this forward pass and
logs it as `aux/<name>`. A term is registered with its reduction and its default weight, the one home of
that default:

    @losses.register_aux("loramoe_blc", weight=0.1)
    def blc(values, batch, cfg):      # values: what was sown, stacked on leading axes -> a scalar
      ...

Values are plain arrays, never Python state: the model's layer scan opens its own collection per layer
body and returns what was sown as a scan output ([L, M, ...]: L layers, M sows of that name per layer),
which it sows again to the caller's collection (one [L, M, ...] value per name); sowing with no open
collection (eval, generation, the reference model) is a no-op.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

_OPEN: list[dict[str, list]] = []


def sow(name: str, value: jax.Array) -> None:
  """Adds `value` to the innermost open collection under `name` (no-op when none is open)."""
  if _OPEN:
    _OPEN[-1].setdefault(name, []).append(value)


@contextlib.contextmanager
def collecting():
  """Opens a collection: yields {name: [values in sowing order]}, filled by `sow` inside the block."""
  sown: dict[str, list] = {}
  _OPEN.append(sown)
  try:
    yield sown
  finally:
    _OPEN.pop()


def stacked(sown: Mapping[str, list]) -> dict[str, jax.Array]:
  """{name: the values sown under it, stacked on a new leading axis} (they must share a shape)."""
  return {k: jnp.stack(v) for k, v in sown.items()}


# ---------------------------------------------------------------------------------------------------
# The registry of terms
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AuxTerm:
  name: str
  reduce: Callable[[jax.Array, Mapping[str, Any], Any], jax.Array]   # (values, batch, cfg) -> scalar
  weight: float                                                      # the default of aux_weights[name]


_TERMS: dict[str, AuxTerm] = {}


def register_aux(name: str, *, weight: float):
  def deco(fn):
    if name in _TERMS:
      raise ValueError(f"auxiliary loss {name!r} registered twice")
    _TERMS[name] = AuxTerm(name, fn, float(weight))
    return fn
  return deco


def aux_default_weights() -> dict[str, float]:
  """{name: default weight} of every registered term (what `config.loss.aux_weights` starts from)."""
  return {k: t.weight for k, t in sorted(_TERMS.items())}


def add_aux_losses(loss: jax.Array, metrics: dict, sown: Mapping[str, list], batch: Mapping[str, Any],
                   cfg) -> tuple[jax.Array, dict]:
  """loss + sum_name aux_weights[name] * term(name); each term logged as `aux/<name>`."""
  weights = dict(aux_default_weights())
  given = cfg.get("aux_weights") if cfg is not None else None
  if given:
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    unknown = sorted(set(given) - set(_TERMS))
    if unknown:
      raise ValueError(f"config.loss.aux_weights: unknown term(s) {unknown}; valid: {', '.join(sorted(_TERMS))}")
    weights.update({k: float(v) for k, v in dict(given).items()})
  metrics = dict(metrics)
  for name, values in sown.items():
    if name not in _TERMS:
      raise ValueError(f"auxiliary loss {name!r} was sown but is not registered; valid: {', '.join(_TERMS)}")
    # One reduction per sowing: the layer scan's [L, M, ...] and a top-level module's [...] differ in shape.
    term = sum(_TERMS[name].reduce(v[None], batch, cfg).astype(jnp.float32) for v in values)
    metrics[f"aux/{name}"] = term
    loss = loss + weights[name] * term
  return loss, metrics
