"""Settings a loss chooses for itself from the data and the model before any training, by loss name.

    entry = losses.get_selection(config.loss.name)    # .fn, .needs, .format
    outputs = losses.model_outputs(model, params, batch, entry.needs)   # per batch, pooled on the host
    stats = entry.fn(pooled_outputs, config.loss)     # JSON-able; stats["best"] = {loss config key: value}

The trainer's `preselect` task (train_lib/preselect.py) runs any registered entry; each loss file keeps its
own statistics (e.g. losses/_kernel_selection.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple


class SelectionEntry(NamedTuple):
  name: str
  fn: Callable[[Mapping[str, Any], Any], dict]   # (pooled outputs [n, K, ...], loss cfg) -> stats
  needs: frozenset                              # `model_outputs` needs of the statistics
  format: Callable[[Mapping[str, Any]], str]    # stats -> markdown


SELECTIONS: dict[str, SelectionEntry] = {}


def register_selection(loss_name: str, *, needs, format_fn):
  def deco(fn):
    if loss_name in SELECTIONS:
      raise ValueError(f"selection statistics for loss {loss_name!r} registered twice")
    SELECTIONS[loss_name] = SelectionEntry(loss_name, fn, frozenset(needs), format_fn)
    return fn
  return deco


def get_selection(loss_name: str) -> SelectionEntry:
  if loss_name not in SELECTIONS:
    raise ValueError(f"loss {loss_name!r} has no pre-training selection statistics; "
                     f"losses with some: {', '.join(sorted(SELECTIONS)) or 'none'}")
  return SELECTIONS[loss_name]
