"""Chaos (issue 11 part 9): a run SIGKILLed many times at random moments (while an asynchronous save is
in flight, right after metrics are written, at random times), then its latest checkpoint truncated, ends
with the metrics.jsonl, TensorBoard scalars and parameters of the uninterrupted run."""
import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import train_runner

SPEC = "configs/sft.py:model=tiny,smoke"
COMMON = {"total_steps": 16, "checkpoint_every_steps": 4, "log_every_steps": 2, "eval_before": False,
          "eval.num_examples": 0, "keep_checkpoints": 3}


def tensorboard_scalars(logdir: str) -> dict:
  """{tag: {step: value}} as TensorBoard shows it: events files in order, a SessionLog START at step p
  (tensorboardX's purge_step) discarding what earlier files logged at steps >= p."""
  from tensorboardX.proto import event_pb2
  out: dict = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + n + 4 > len(data):
        break                                   # a torn last record
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
        for series in out.values():
          for s in [s for s in series if s >= ev.step]:
            del series[s]
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


def _committed(ckpts):
  if not os.path.isdir(ckpts):
    return set()
  names = os.listdir(ckpts)
  return {n for n in names if n.isdigit() and not any(m.startswith(f"{n}.") for m in names)}


def _wait_and_kill(proc, wd, moment, rng, deadline):
  """Kills `proc` during an asynchronous save (a temporary checkpoint directory exists), or once it has
  committed a new checkpoint and then either written metrics again or run on for a random time."""
  ckpts = os.path.join(wd, "checkpoints")
  metrics = os.path.join(wd, "metrics.jsonl")
  have = _committed(ckpts)
  size = t_kill = None
  while time.time() < deadline and proc.poll() is None:
    if moment == "async_save":
      if os.path.isdir(ckpts) and any("tmp" in n for n in os.listdir(ckpts)):
        break
    elif _committed(ckpts) - have:
      if moment == "metrics":
        cur = os.path.getsize(metrics) if os.path.exists(metrics) else 0
        size = cur if size is None else size
        if cur > size:
          break
      else:
        t_kill = time.time() + rng.uniform(0.0, 1.5) if t_kill is None else t_kill
        if time.time() > t_kill:
          break
    time.sleep(0.002)
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.slow
@pytest.mark.chaos
def test_killed_many_times_then_truncated_ends_equal_to_the_uninterrupted_run(tmp_path):
  ref = train_runner.run(SPEC, tmp_path / "ref", tmp_path / "ref.npz", COMMON)
  wd = str(tmp_path / "chaos")
  rng = random.Random(11)
  out = tmp_path / "chaos.npz"
  for moment in ("async_save", "metrics", "random"):
    proc = subprocess.Popen([sys.executable, train_runner.__file__, SPEC, wd, str(out), json.dumps(COMMON)],
                            cwd=train_runner.ROOT, env=train_runner.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_and_kill(proc, wd, moment, rng, time.time() + 300)
  steps = sorted(int(n) for n in _committed(os.path.join(wd, "checkpoints")))
  assert steps, "no checkpoint was committed before the kills"
  if len(steps) > 1 and steps[-1] < COMMON["total_steps"]:
    state = os.path.join(wd, "checkpoints", str(steps[-1]), "state")
    for dirpath, _, files in os.walk(state):      # a truncated latest checkpoint on top
      for name in files:
        path = os.path.join(dirpath, name)
        if os.path.getsize(path) > 64:
          with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
  if out.exists():
    out.unlink()
  r = subprocess.run([sys.executable, train_runner.__file__, SPEC, wd, str(out), json.dumps(COMMON)],
                     cwd=train_runner.ROOT, env=train_runner.env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  with np.load(out) as f:
    got = dict(f)
  assert int(got["resumed_from"]) > 0          # it resumed (from the newest intact checkpoint)
  assert f"resumed from step {int(got['resumed_from'])}" in r.stdout
  np.testing.assert_array_equal(got["losses"], ref["losses"])
  for k in ref:
    if k.startswith("param/"):
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  read = lambda d: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s",)}
                    for l in open(os.path.join(d, "metrics.jsonl"))]
  assert read(wd) == read(tmp_path / "ref")
  tb_ref, tb_got = tensorboard_scalars(str(tmp_path / "ref" / "tensorboard")), tensorboard_scalars(
      os.path.join(wd, "tensorboard"))
  for tag in ("loss", "grad_norm", "lr", "eval/loss"):
    assert tb_got[tag].keys() == tb_ref[tag].keys(), tag
    np.testing.assert_array_equal(list(tb_got[tag].values()), list(tb_ref[tag].values()), err_msg=tag)
  records = {r["step"]: r["loss"] for r in read(wd) if "loss" in r}
  np.testing.assert_allclose([tb_got["loss"][s] for s in records], list(records.values()), rtol=1e-6)
