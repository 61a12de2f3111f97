"""What a workdir holds and how it stays whole: orbax checkpoints of the train state and the data
iterator's position, the workdir lock, the history of the run's configs, and atomic small files.

Only the trainable part of the parameters is in the state (the frozen base of an adapter run is rebuilt
from its source), so an adapter run's checkpoint holds adapter tensors and their optimizer state only.

    workdir/lock               host, PID and start time of the process training here (`WorkdirLock`)
    workdir/config.json        the config the run was started with (never overwritten)
    workdir/configs/NNNN.json  the config of every start, in order; `latest_config` reads the newest
    workdir/checkpoints/N      orbax step directories; an unreadable newest one is moved to
    workdir/corrupt_checkpoints/N-<time> and the newest intact one is restored (`restore_latest`)
    workdir/previous/NNNN/     what `resume_policy=restart` moved aside (nothing is deleted)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from train_lib.validate import RESUME_POLICIES, UserError

CONFIG_FILE = "config.json"
HISTORY_DIR = "configs"
LOCK_FILE = "lock"

# Fields a resumed run may change: they decide how long and how observably it runs, not what the
# checkpoints hold or how a step computes. Prefixes end in ".".
SAFE_ON_RESUME = ("total_steps", "eval_every_steps", "eval_before", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "async_checkpoints", "entanglement_every_steps", "stuck_loss_window",
                  "resume_policy", "eval.", "mesh.", "model.remat", "model.attention_impl",
                  "model.logits_chunk", "dry_run")


class WorkdirError(UserError):
  """A workdir that cannot be used as it is: locked, a config that does not match, no intact checkpoint."""


# =====================================================================================================
# Small files, written whole or not at all
# =====================================================================================================
def atomic_write(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, syncs it and renames it over `path`: a kill leaves
  either the old file or the new one, never a torn one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str, default=None):
  """A JSON file, or `default` (with a warning) when it is missing or unreadable."""
  if not os.path.exists(path):
    return default
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s); ignoring it", path, e)
    return default


# =====================================================================================================
# The workdir lock
# =====================================================================================================
def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:    # another user's live process
    return True
  return True


class WorkdirLock:
  """`workdir/lock`: one training process per workdir. The file (host, PID, start time) is made with a
  hard link from a complete temporary file, so it is never half-written. A lock whose holder is a dead
  process on this host is stale and taken over (with a warning); any other holder stops this run at
  once, named. A lock from another host cannot be checked: the message says how to remove it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.held = False

  def holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = f"{self.path}.{me['host']}.{me['pid']}"
    with open(tmp, "w") as f:
      json.dump(me, f)
    try:
      for _ in range(2):
        try:
          os.link(tmp, self.path)
          self.held = True
          return self
        except FileExistsError:
          h = self.holder()
          if h is None:
            continue
          same_host = h.get("host") == me["host"]
          pid = h.get("pid")
          if h and same_host and isinstance(pid, int) and pid != me["pid"] and not _alive(pid):
            logging.warning("taking over the stale lock %s of process %d (no longer running)", self.path, pid)
            print(f"workdir lock: process {pid} on {h['host']} held {self.path} but is gone; taking it over",
                  flush=True)
            os.remove(self.path)
            continue
          who = (f"process {pid} on host {h.get('host')} (since {h.get('started')})" if h
                 else "an unreadable lock file")
          hint = f"; if no run is using this workdir any more, delete {self.path}"
          raise WorkdirError(f"the workdir is in use: {self.path} is held by {who}{hint}")
      raise WorkdirError(f"could not take the workdir lock {self.path}")
    finally:
      os.remove(tmp)

  def release(self) -> None:
    if self.held:
      h = self.holder()
      if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
        os.remove(self.path)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# =====================================================================================================
# The history of the run's configs
# =====================================================================================================
def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict, new: dict) -> dict:
  """{dotted field: (old value, new value)} for every field that differs (lists compared as lists)."""
  a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
  missing = object()
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)}


def safe_on_resume(field: str) -> bool:
  return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE_ON_RESUME)


def history(workdir: str) -> list[str]:
  d = os.path.join(workdir, HISTORY_DIR)
  if not os.path.isdir(d):
    return []
  return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".json") and n[:-5].isdigit())


def latest_config(workdir: str) -> dict | None:
  """The config of the newest start (configs/NNNN.json), else config.json, else None."""
  for path in reversed(history(workdir)):
    cfg = read_json(path)
    if cfg is not None:
      return cfg
  return read_json(os.path.join(workdir, CONFIG_FILE))


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def move_aside(workdir: str) -> str:
  """Moves the outputs of the run in `workdir` to workdir/previous/NNNN (resume_policy=restart)."""
  prev = os.path.join(workdir, "previous")
  os.makedirs(prev, exist_ok=True)
  dest = os.path.join(prev, f"{len(os.listdir(prev)):04d}")
  os.makedirs(dest)
  for name in ("checkpoints", "metrics.jsonl", "tensorboard", "summary.json", "loss_curve.png", CONFIG_FILE,
               HISTORY_DIR):
    src = os.path.join(workdir, name)
    if os.path.exists(src):
      shutil.move(src, os.path.join(dest, name))
  return dest


def record_config(workdir: str, config_dict: dict, policy: str = "strict", write: bool = True) -> dict:
  """Compares the config of this start with the one the workdir's checkpoints were written with, before
  anything is written; then adds it to the history. Returns {"changes", "restarted_from"}.

  strict (default): resume when only fields listed in SAFE_ON_RESUME changed, else stop naming each
  changed field. allow: resume whatever changed (a warning lists the changes). restart: move the earlier
  run's outputs to workdir/previous/NNNN and start from step 0 with this config. `write=False` (the other
  hosts of a multi-host run) compares only.
  """
  if policy not in RESUME_POLICIES:
    raise WorkdirError(f"config.resume_policy={policy!r}; valid: {', '.join(RESUME_POLICIES)}")
  old = latest_config(workdir)
  changes = config_changes(old, config_dict) if old is not None else {}
  changes.pop("resume_policy", None)
  out = {"changes": changes, "restarted_from": None}
  if changes and has_checkpoint(workdir):
    unsafe = {k: v for k, v in changes.items() if not safe_on_resume(k)}
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in (unsafe or changes).items())
    if unsafe and policy == "strict":
      raise WorkdirError(
          f"{workdir} holds a run with another config, so it cannot be resumed: {listing}. "
          f"--config.resume_policy=allow resumes anyway; --config.resume_policy=restart moves the earlier "
          f"run to {os.path.join(workdir, 'previous')} and starts again; or use another --workdir")
    if unsafe and policy == "restart" and not write:
      out["restarted_from"] = os.path.join(workdir, "previous")
    elif unsafe and policy == "restart":
      out["restarted_from"] = move_aside(workdir)
      print(f"config changed ({listing}): the earlier run moved to {out['restarted_from']}; starting again",
            flush=True)
    else:
      print(f"resuming with a changed config: {listing}", flush=True)
  if not write:
    return out
  d = os.path.join(workdir, HISTORY_DIR)
  os.makedirs(d, exist_ok=True)
  text = json.dumps(config_dict, indent=2, default=str)
  atomic_write(os.path.join(d, f"{len(history(workdir)):04d}.json"), text)
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    atomic_write(os.path.join(workdir, CONFIG_FILE), text)
  return out


# =====================================================================================================
# Checkpoints
# =====================================================================================================
class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._options = dict(max_to_keep=max_to_keep, async_save=async_save)
    self._open()

  def _open(self):
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._options["max_to_keep"],
                                             enable_async_checkpointing=self._options["async_save"],
                                             create=True),
        item_names=("state", "data", "frozen"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False, frozen=None) -> bool:
    """`frozen` is saved only by runs that write trained values into it (layer sampling)."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    if frozen is not None:
      items["frozen"] = ocp.args.StandardSave(frozen)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, abstract_frozen=None):
    """abstract_*: trees of jax.ShapeDtypeStruct (with shardings) shaped like what was saved.
    Returns (state, data_state, frozen or None)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if abstract_frozen is not None:
      items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
    r = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return r["state"], r["data"], (r["frozen"] if abstract_frozen is not None else None)

  def restore_latest(self, abstract_state, abstract_frozen=None):
    """The newest checkpoint that restores: (step, state, data_state, frozen), or None when there is none.

    A checkpoint that fails to restore (truncated or missing files) is reported with its step and path,
    moved to workdir/corrupt_checkpoints/ and the next older one is tried (a warning says so); when none
    restores the run stops naming each one and why."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      try:
        state, data_state, frozen = self.restore(step, abstract_state, abstract_frozen)
      except Exception as e:   # pylint: disable=broad-except  (orbax / tensorstore raise many types)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        failures.append((step, path, why))
        continue
      if failures:
        self._quarantine([s for s, _, _ in failures])
        named = "; ".join(f"step {s} at {p} ({w})" for s, p, w in failures)
        msg = (f"WARNING: checkpoint {named} could not be read; moved to "
               f"{os.path.join(self.workdir, 'corrupt_checkpoints')}; resuming from the intact step {step}")
        logging.warning(msg)
        print(msg, flush=True)
      return step, state, data_state, frozen
    if failures:
      named = "; ".join(f"step {s} at {p} ({w})" for s, p, w in failures)
      raise WorkdirError(f"no intact checkpoint in {self.directory}: {named}. If they were written with "
                         f"another model or optimizer (see {os.path.join(self.workdir, 'configs')}), rerun with "
                         f"that config; else move the directory away, or use --config.resume_policy=restart "
                         f"with a changed config")
    return None

  def _quarantine(self, steps):
    self.manager.close()
    if jax.process_index() == 0:     # one process moves; the others wait for it (a shared workdir)
      dest = os.path.join(self.workdir, "corrupt_checkpoints")
      os.makedirs(dest, exist_ok=True)
      for s in steps:
        shutil.move(os.path.join(self.directory, str(s)), os.path.join(dest, f"{s}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("quarantine_checkpoints")
    self._open()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
