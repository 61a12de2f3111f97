"""Builds the whole optimizer from `config.optim` and the trainable parameter tree.

    tx, schedule = optim.make(config.optim, trainable_params, total_steps)

One chain: global-norm clipping -> per-rule optimizers (ordered regexes over '/' paths, first full match
wins, `None` freezes with `set_to_zero`, every leaf must be covered) -> done. The schedule is warmup then
cosine / linear / constant decay. `optax.masked` is avoided for freezing on purpose: it passes masked-out
updates through unchanged (raw gradients).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

import peft
from peft._registry import get_optimizer

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = cfg.learning_rate, cfg.get("warmup_steps", 0)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * cfg.get("end_lr_ratio", 0.0)
  name = cfg.get("schedule", "cosine")
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.get("end_lr_ratio", 0.0))
  elif name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule={name!r}; valid: {SCHEDULES}")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
  return decay


def first_match_labels(params, rules, default=None) -> Any:
  """Label tree: for each real leaf the value of the first rule whose regex fully matches its path."""
  compiled = [(re.compile(r), v) for r, v in rules]
  seen = {}

  def label(path, x):
    if x is None:
      return None
    for rx, v in compiled:
      if rx.fullmatch(path):
        seen.setdefault(rx.pattern, []).append(path)
        return "__frozen__" if v is None else v
    if default is not None:
      return default
    raise ValueError(f"parameter {path!r} matches no rule of config.optim.rules "
                     f"({[r for r, _ in rules]}); add a catch-all ('.*', ...)")

  labels = peft.map_with_path(label, params, is_leaf=lambda z: z is None)
  for pattern, paths in seen.items():
    logging.info("optim rule %r matches %d leaves (e.g. %s)", pattern, len(paths), paths[0])
  return labels


def _sub_config(cfg, name):
  """The optimizer config of rule `name`: cfg.<name> overrides on top of cfg."""
  sub = ml_collections.ConfigDict(cfg.to_dict())
  overrides = cfg.get("per_optimizer", {}).get(name, {}) if cfg.get("per_optimizer") else {}
  with sub.unlocked():
    for k, v in dict(overrides).items():
      sub[k] = v
  return sub


def make(cfg, params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
  rules = [tuple(r) for r in cfg.get("rules", None) or [(".*", cfg.name)]]
  labels = first_match_labels(params, rules)
  names = sorted({v for v in jax.tree.leaves(labels) if v != "__frozen__"} | {cfg.name})
  transforms = {n: get_optimizer(n)(schedule, _sub_config(cfg, n)) for n in names}
  transforms["__frozen__"] = optax.set_to_zero()
  if len(set(jax.tree.leaves(labels))) == 1 and jax.tree.leaves(labels)[0] == cfg.name:
    tx = transforms[cfg.name]
  else:
    tx = optax.multi_transform(transforms, labels)
  if cfg.get("grad_clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule
