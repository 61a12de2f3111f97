"""Config validation before anything compiles: a wrong name or an incompatible combination fails at once,
listing the valid options."""
from __future__ import annotations

import jax
import numpy as np

import losses
import models
import optim
import peft
from optim import optimizer_names

TASKS = ("train", "eval", "diagnose", "export", "sweep", "merge")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  pass


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def validate(config, num_devices: int | None = None) -> None:
  _check(config.get("task", "train") in TASKS, f"config.task={config.get('task')!r}; valid: {TASKS}")
  if config.get("task", "train") != "train":
    return
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
  want = {"sft": ("sft",), "pairwise": ("pairwise",), "listwise": ("listwise", "pairwise"),
          "unpaired": ("unpaired",)}[kind]
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
