"""End to end: the smoke config trains, resumes after SIGKILL exactly, and 8 devices equal 1."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "train_runner.py")
SMOKE = "configs/sft.py:model=tiny,smoke"


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(tmp_path, name, overrides, devices=1):
  wd, out = tmp_path / name, tmp_path / f"{name}.npz"
  r = subprocess.run([sys.executable, RUNNER, SMOKE, str(wd), str(out), json.dumps(overrides)],
                     cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return dict(np.load(out)), wd


def _params(res):
  return {k: v for k, v in res.items() if k.startswith("param/")}


def _assert_same_params(a, b, rtol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)


@pytest.mark.slow
def test_eight_simulated_devices_equal_one(tmp_path):
  common = {"total_steps": 6, "eval_before": False, "eval.num_examples": 0}
  one, _ = _run(tmp_path, "one", {**common, "mesh.data": 1})
  eight, _ = _run(tmp_path, "eight", {**common, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, devices=8)
  assert int(eight["devices"]) == 8 and int(one["devices"]) == 1
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  _assert_same_params(_params(eight), _params(one), rtol=2e-4)
  # The run changed the parameters (so equality is not trivially true).
  init, _ = _run(tmp_path, "init", {**common, "total_steps": 1, "optim.learning_rate": 1e-12})
  diff = max(np.abs(one[k] - init[k]).max() for k in _params(one))
  assert diff > 1e-3


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  common = {"total_steps": 40, "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_before": False,
            "eval.num_examples": 0, "async_checkpoints": True}
  full, _ = _run(tmp_path, "full", common)

  wd, out = tmp_path / "killed", tmp_path / "killed.npz"
  proc = subprocess.Popen([sys.executable, RUNNER, SMOKE, str(wd), str(out), json.dumps(common)], cwd=ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = wd / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if (ckpts / "8").is_dir() and not any(p.name.startswith("8.") for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not out.exists()

  resumed, _ = _run(tmp_path, "killed", common)
  assert 8 <= int(resumed["resumed_from"]) < 40
  _assert_same_params(_params(resumed), _params(full), rtol=1e-6)
  np.testing.assert_allclose(resumed["losses"][-1], full["losses"][-1], rtol=1e-6)
