"""Config validation before anything compiles: a wrong name or an incompatible combination fails at once,
listing the valid options."""
from __future__ import annotations

import jax
import numpy as np

import data as data_lib
import losses
import models
import optim
import peft
from optim import optimizer_names

TASKS = ("train", "eval", "diagnose", "export", "sweep", "merge", "preselect")
DTYPES = ("float32", "bfloat16", "float16")
RESUME_POLICIES = ("strict", "allow", "restart")


class UserError(Exception):
  """An error of the user's input or workdir, reported by main.py as one message without a traceback."""


class ConfigError(UserError, ValueError):
  pass


POSITIVE = ("batch_size", "seq_len", "total_steps", "log_every_steps", "checkpoint_every_steps",
            "keep_checkpoints", "eval.batch_size")
NON_NEGATIVE = ("eval_every_steps", "entanglement_every_steps", "eval.num_loss_batches", "eval.num_examples",
                "eval.max_new_tokens", "stuck_loss_window")


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return None
    node = node.get(part)
  return node


def check_numbers(config) -> None:
  """Sizes and intervals: a 0 or a negative value fails here instead of dividing by zero, deleting every
  checkpoint or "training" on empty batches."""
  for key in POSITIVE + NON_NEGATIVE:
    v = _get(config, key)
    if v is None:
      continue
    _check(isinstance(v, (int, np.integer)) and not isinstance(v, bool),
           f"config.{key} must be an integer, got {v!r}")
    if key in POSITIVE:
      _check(v > 0, f"config.{key} must be > 0, got {v}" +
             (" (1 keeps only the newest checkpoint)" if key == "keep_checkpoints" else ""))
    else:
      _check(v >= 0, f"config.{key} must be >= 0 (0 = off), got {v}")
  ec = config.get("eval") or {}
  if ec.get("num_examples"):
    _check(int(ec.get("max_new_tokens", 1)) > 0, "config.eval.max_new_tokens must be > 0 when "
           "config.eval.num_examples > 0")


def check_data(config) -> None:
  """The data config resolves, and the files of the train split and (when evaluation is on) of the eval
  split exist: a path without {split} fails now, not at the final evaluation."""
  dc = config.data
  if dc.get("pref_kind") == "listwise" and int(dc.get("list_size", 4)) < 2:
    raise ConfigError(f"config.data.list_size must be >= 2 for listwise data, got {dc.get('list_size')}")
  ec = config.get("eval") or {}
  splits = ["train"]
  if ec.get("num_loss_batches", 4) or ec.get("num_examples", 0):
    splits.append(config.get("eval_split", "test"))
  for split in splits:
    try:
      data_lib.split_files(dc, split)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.data ({split} split): {e}") from None


def validate(config, num_devices: int | None = None, check_files: bool = True) -> None:
  """check_files=False: the data files need not exist yet (a dry run)."""
  _check(config.get("task", "train") in TASKS, f"config.task={config.get('task')!r}; valid: {TASKS}")
  if config.get("task", "train") != "train":
    return
  check_numbers(config)
  _check(config.get("resume_policy", "strict") in RESUME_POLICIES,
         f"config.resume_policy={config.get('resume_policy')!r}; valid: {', '.join(RESUME_POLICIES)}")
  if check_files:
    check_data(config)
  mc = config.model
  if not mc.get("hf_path") and not mc.get("init_workdir"):
    _check(mc.name in models.PRESETS, f"config.model.name={mc.name!r}; valid: {', '.join(models.PRESETS)}")
  for k in ("dtype", "param_dtype"):
    _check(mc.get(k, "float32") in DTYPES, f"config.model.{k}={mc.get(k)!r}; valid: {DTYPES}")
  _check(mc.get("remat", "none") in models.REMAT_POLICIES,
         f"config.model.remat={mc.get('remat')!r}; valid: {models.REMAT_POLICIES}")
  _check(config.loss.name in losses.names(),
         f"config.loss.name={config.loss.name!r}; valid: {', '.join(losses.names())}")
  if config.get("peft") is not None:
    peft.check_config(config.peft)
  try:
    optim.check_config(config)      # config.optim and the sections of the optimizers' host work
  except ValueError as e:
    raise ConfigError(str(e)) from None
  kind = config.data.get("pref_kind") or "sft"
  entry = losses.get(config.loss.name)
  try:     # a loss checks its options when asked what it needs and which frozen model it reads
    entry.needs_for(config.loss)
    entry.frozen_model_path(config.loss)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  want = {"sft": ("sft",), "pairwise": ("pairwise",), "listwise": ("listwise", "pairwise"),
          "unpaired": ("unpaired",)}[kind]
  to_pairs = config.data.get("list_to_pairs")
  if to_pairs is not None:
    _check(to_pairs in data_lib.LIST_TO_PAIRS,
           f"config.data.list_to_pairs={to_pairs!r}; valid: None, {', '.join(data_lib.LIST_TO_PAIRS)}")
    _check(kind == "listwise", f"config.data.list_to_pairs={to_pairs!r} turns listwise records into pairs; "
           f"config.data.pref_kind is {config.data.get('pref_kind')!r}")
    _check(entry.kind == "pairwise", f"config.data.list_to_pairs={to_pairs!r} makes pairs, but "
           f"config.loss.name={config.loss.name!r} is a {entry.kind} loss: drop list_to_pairs")
  elif kind == "listwise" and entry.kind == "pairwise":
    raise ConfigError(
        f"config.loss.name={config.loss.name!r} is a pairwise loss but the data is listwise: it would take "
        f"list entries 0 and 1 as chosen and rejected whatever their scores. Set "
        f"--config.data.list_to_pairs=best_worst|all_pairs|adjacent to build pairs from the scores (ties "
        f"are left out and counted), or use a listwise loss")
  _check(entry.kind in want,
         f"config.loss.name={config.loss.name!r} is a {entry.kind} loss but config.data.pref_kind is "
         f"{config.data.get('pref_kind')!r}; {entry.kind} losses need pref_kind "
         f"{ {'sft': None, 'pairwise': 'pairwise', 'listwise': 'listwise', 'unpaired': 'unpaired'}[entry.kind]!r}")
  try:
    oc = optim.resolve(config.optim)    # unknown keys and options fail here, listing the valid ones
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(oc.name in optimizer_names(), f"config.optim.name={oc.name!r}; valid: {', '.join(optimizer_names())}")
  _check(oc.get("schedule", "cosine") in optim.SCHEDULES,
         f"config.optim.schedule={oc.get('schedule')!r}; valid: {optim.SCHEDULES}")
  for rule in oc.get("rules", None) or []:
    _check(len(rule) == 2, f"config.optim.rules entry {rule!r} must be (regex, optimizer name or None)")
    _check(rule[1] is None or rule[1] in optimizer_names(),
           f"config.optim.rules: optimizer {rule[1]!r}; valid: {', '.join(optimizer_names())} or None")
  _check(oc.learning_rate > 0, f"config.optim.learning_rate must be > 0, got {oc.learning_rate}")
  _check(int(config.total_steps) > 0, f"config.total_steps must be > 0, got {config.total_steps}")
  accum = int(oc.get("grad_accum_steps", 1))
  _check(accum >= 1 and config.batch_size % accum == 0,
         f"config.batch_size={config.batch_size} must be divisible by config.optim.grad_accum_steps={accum}")
  n = num_devices or jax.device_count()
  mesh = dict(config.get("mesh", {}) or {})
  sizes = {a: int(mesh.get(a, -1 if a == "data" else 1)) for a in ("data", "fsdp", "tensor")}
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  _check(n % known == 0, f"config.mesh {sizes} does not fit {n} devices")
  resolved = {a: (n // known if v == -1 else v) for a, v in sizes.items()}
  dp = resolved["data"] * resolved["fsdp"]
  _check(config.batch_size % max(dp, 1) == 0,
         f"config.batch_size={config.batch_size} must be divisible by the data-parallel size {dp} "
         f"(mesh data x fsdp)")
  _check((config.batch_size // accum) % max(dp, 1) == 0 or accum == 1,
         f"each micro-batch ({config.batch_size // accum}) must be divisible by the data-parallel size {dp}")
  if config.data.get("pref_packing", "none") != "none":    # padding-free preference rows: [G, rows, T]
    _check(bool(config.data.get("pref_kind")), f"config.data.pref_packing={config.data.pref_packing!r} packs "
           f"preference batches; config.data.pref_kind is not set (SFT rows use config.data.packing)")
    groups = int(config.data.get("pref_pack_groups", 1))
    _check(groups >= 1 and config.batch_size % groups == 0 and groups % accum == 0
           and (groups // accum) % max(dp, 1) == 0 and groups % jax.process_count() == 0,
           f"config.data.pref_pack_groups={groups} must divide config.batch_size={config.batch_size} and be a "
           f"multiple of config.optim.grad_accum_steps={accum} times the data-parallel size {dp} and of the "
           f"{jax.process_count()} processes (each micro-batch and device takes whole groups)")
