"""Builds the whole optimizer from `config.optim` and the trainable parameter tree.

    tx, schedule = optim.make(config.optim, trainable_params, total_steps)
    tx, schedule = optim.from_config(config, trainable_params)   # + TempBalance when config.tempbalance asks

`config.optim` holds what every run has (name, learning rate and schedule, clipping, accumulation, rules)
and one section per registered optimizer with that optimizer's options (`config.optim.galore.rank`), made
by `default_config` from the factories' keyword defaults. A key that is neither fails at once.

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
from optim import _registry
from optim import _sampling
from optim import _tempbalance

SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
  """`config.optim`: the settings every run has, then one section per registered optimizer."""
  c = ml_collections.ConfigDict()
  c.name = "adamw"                  # the registered optimizer of every leaf no rule names
  c.learning_rate = 1e-3            # peak
  c.warmup_steps = 50               # linear warmup from 0
  c.schedule = "cosine"             # cosine | linear | constant (after warmup)
  c.end_lr_ratio = 0.1              # final lr / peak lr (cosine, linear)
  c.grad_clip_norm = 1.0            # global-norm clipping; 0 disables
  c.grad_accum_steps = 1            # micro-batches per step (the batch is split along B)
  c.rules = ()                      # ((regex, optimizer name or None to freeze), ...); () = all `name`
  c.no_decay = NO_DECAY             # regex (full match on '/' paths) of leaves never decayed; '' = decay all
  for name in _registry.optimizer_names():
    c[name] = _registry.default_config(name)
  return c


_COMMON = ("name", "learning_rate", "warmup_steps", "schedule", "end_lr_ratio", "grad_clip_norm",
           "grad_accum_steps", "rules", "no_decay")

# The weight-decay mask of the references' HF Trainer (`get_decay_parameter_names`: every parameter but
# biases and LayerNorm weights; embeddings are decayed): biases, and every leaf of a module whose name holds
# 'norm' (RMSNorm scales), slot nodes of layer sampling included.
NO_DECAY = r"(.*/)?bias(/.*)?|(.*/)?[^/]*norm[^/]*/.*"

# Optimizers whose weight decay is decoupled and scaled by the schedule, -eta_t * wd * p: TempBalance's
# weight-decay multipliers (`hyperparam='wd'`) rescale exactly that term.
_SCHEDULED_DECAY = ("adamw", "galore", "fira", "frugal", "lora_pro")


def check_keys(cfg) -> None:
  """Every key of `config.optim` is a common setting or a registered optimizer's section."""
  names = set(_registry.optimizer_names())
  unknown = sorted(k for k in cfg.keys() if k not in _COMMON and k not in names)
  if unknown:
    raise ValueError(f"config.optim: unknown key(s) {unknown}; valid: {', '.join(_COMMON)}, and one section "
                     f"per optimizer ({', '.join(sorted(names))}) holding its options, e.g. "
                     f"config.optim.galore.rank")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  end = lr * cfg.end_lr_ratio
  name = cfg.schedule
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_ratio)
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


def resolve(cfg) -> ml_collections.ConfigDict:
  """`cfg` over `default_config()`: missing settings and options take their defaults; unknown keys raise."""
  check_keys(cfg)
  out = default_config()
  given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  for k, v in given.items():
    if k in _COMMON:
      out[k] = v
    else:
      _registry.check_options(k, v)
      out[k].update(v)
  return out


_NO_DECAY_SUFFIX = ":no_decay"


def _decay_section(name: str, cfg) -> str | None:
  """The config section whose `weight_decay` optimizer `name` applies: its own, or, for a wrapper with an
  `inner` optimizer (HFT), the inner one's; None for an optimizer that does not decay."""
  opts = _registry.options(name)
  if "weight_decay" in opts:
    return name
  if "inner" in opts:
    return _decay_section(cfg[name].get("inner") or opts["inner"][0], cfg)
  return None


def _decay_of(name: str, cfg) -> float:
  """The weight decay optimizer `name` applies (0 for one without the option)."""
  section = _decay_section(name, cfg)
  return float(cfg[section].get("weight_decay") or 0.0) if section else 0.0


def decay_labels(params, cfg) -> Any:
  """The optimizer label of every leaf (`config.optim.rules`), with ':no_decay' appended where the leaf
  matches `config.optim.no_decay` and its optimizer decays: that leaf gets the same optimizer built with
  weight_decay=0, so the mask holds for every registered optimizer with a `weight_decay` option."""
  rules = [tuple(r) for r in cfg.rules or [(".*", cfg.name)]]
  labels = first_match_labels(params, rules)
  if not cfg.no_decay:
    return labels
  rx = re.compile(cfg.no_decay)

  def relabel(path, label):
    if label is None or label == "__frozen__" or not _decay_of(label, cfg) or not rx.fullmatch(path):
      return label
    return label + _NO_DECAY_SUFFIX
  return peft.map_with_path(relabel, labels, is_leaf=lambda z: z is None)


def _build(label: str, schedule, cfg) -> optax.GradientTransformation:
  if not label.endswith(_NO_DECAY_SUFFIX):
    return _registry.build(label, schedule, cfg)
  name = label[:-len(_NO_DECAY_SUFFIX)]
  sections = ml_collections.ConfigDict(cfg.to_dict())
  sections[_decay_section(name, cfg)].weight_decay = 0.0
  return _registry.build(name, schedule, sections)


def weight_decay_tree(cfg, params) -> Any:
  """Per leaf, the weight decay its optimizer applies to it (0 where `no_decay` matches)."""
  cfg = resolve(cfg)
  labels = decay_labels(params, cfg)
  return jax.tree.map(lambda l: 0.0 if l == "__frozen__" or l.endswith(_NO_DECAY_SUFFIX) else _decay_of(l, cfg),
                      labels)


def make(cfg, params, total_steps: int, per_block=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`per_block`: {optimizer name: factory(build, schedule)}, optimizers built by the factory from
  `build(learning_rate)` instead (layer sampling's per-block state, `_sampling.per_block_optimizers`)."""
  cfg = resolve(cfg)
  schedule = make_schedule(cfg, total_steps)
  labels = decay_labels(params, cfg)
  names = sorted({v for v in jax.tree.leaves(labels) if v != "__frozen__"} | {cfg.name})
  per_block = per_block or {}

  def build_one(n):
    base = n[:-len(_NO_DECAY_SUFFIX)] if n.endswith(_NO_DECAY_SUFFIX) else n
    if base in per_block:
      return per_block[base](lambda lr, n=n: _build(n, lr, cfg), schedule)
    return _build(n, schedule, cfg)
  transforms = {n: build_one(n) for n in names}
  transforms["__frozen__"] = optax.set_to_zero()
  if len(set(jax.tree.leaves(labels))) == 1 and jax.tree.leaves(labels)[0] == cfg.name:
    tx = transforms[cfg.name]
  else:
    tx = optax.multi_transform(transforms, labels)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule


def from_config(config, trainable) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of a run: `make(config.optim)`, followed by TempBalance's layerwise multipliers when
  `config.tempbalance.enabled` (their values are refreshed between steps by its host hook)."""
  tx, schedule = make(config.optim, trainable, int(config.total_steps),
                      per_block=_sampling.per_block_optimizers(config, trainable))
  tx = _registry.adapter_transform(config, trainable, tx)   # e.g. AdaLoRA's rank allocator
  tb = config.get("tempbalance")
  if tb is None or not _tempbalance.RunConfig.from_config(tb).enabled:
    return tx, schedule
  hyperparam = _tempbalance.tempbalance_config(tb).hyperparam
  if hyperparam == "lr":
    return _tempbalance.tempbalance(tx), schedule
  return _tempbalance.tempbalance(tx, hyperparam=hyperparam, learning_rate=schedule,
                                  weight_decay=_tempbalance_decay(config.optim, trainable)), schedule


def _tempbalance_decay(optim_cfg, trainable) -> Any:
  """The per-leaf decays TempBalance's weight-decay multipliers rescale; refuses optimizers whose decay is
  not -eta_t * wd * p, and a run with no decay at all (the multipliers would change nothing)."""
  cfg = resolve(optim_cfg)
  labels = decay_labels(trainable, cfg)
  used = {l.removesuffix(_NO_DECAY_SUFFIX) for l in jax.tree.leaves(labels) if l != "__frozen__"}
  bad = sorted(n for n in used if _decay_of(n, cfg) and (
      n not in _SCHEDULED_DECAY or cfg[n].get("decay_updated_weights", False)))
  if bad:
    raise ValueError(f"config.tempbalance.hyperparam=wd/hybrid rescales a decay of the form -lr * wd * p; "
                     f"{bad} decay otherwise (supported: {', '.join(_SCHEDULED_DECAY)}, without "
                     f"decay_updated_weights)")
  tree = weight_decay_tree(cfg, trainable)
  if not any(jax.tree.leaves(tree)):
    raise ValueError("config.tempbalance.hyperparam=wd/hybrid needs weight decay: set "
                     "config.optim.<optimizer>.weight_decay > 0 (e.g. config.optim.adamw.weight_decay=0.1)")
  return tree


def check_config(config) -> None:
  """Fails at once on a bad `config.optim`, `config.sampling` or `config.tempbalance`, naming the valid
  values (before anything is built or compiled)."""
  resolve(config.optim)
  method = (config.get("sampling") or {}).get("method")
  if method is not None and method not in _sampling.METHODS:
    raise ValueError(f"config.sampling.method={method!r}: unknown layer-sampling method; valid: "
                     f"{_sampling.METHODS}")
  if config.get("tempbalance") is not None:
    _tempbalance.RunConfig.from_config(config.tempbalance)
