"""OwLore killed mid-run (SIGKILL) and restarted from its workdir equals the uninterrupted run: the frozen
tree (written back at every draw) is checkpointed, and draws are a function of (seed, step)."""
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
SMOKE = "configs/owlore.py:model=tiny,smoke"
COMMON = {"total_steps": 24, "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_before": False,
          "eval.num_examples": 0, "async_checkpoints": True, "sampling.interval_steps": 6,
          "optim.update_proj_gap": 3, "model.overrides": {"num_layers": 3}}


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(tmp_path, name):
  wd, out = tmp_path / name, tmp_path / f"{name}.npz"
  r = subprocess.run([sys.executable, RUNNER, SMOKE, str(wd), str(out), json.dumps(COMMON)], cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return dict(np.load(out))


@pytest.mark.slow
def test_owlore_resume_after_sigkill_equals_uninterrupted(tmp_path):
  full = _run(tmp_path, "full")
  wd, out = tmp_path / "killed", tmp_path / "killed.npz"
  proc = subprocess.Popen([sys.executable, RUNNER, SMOKE, str(wd), str(out), json.dumps(COMMON)], cwd=ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = wd / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    # Step 8 is saved: the run is past its second draw (step 6) and mid-way through a projector period.
    if (ckpts / "8").is_dir() and not any(p.name.startswith("8.") for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not out.exists()

  resumed = _run(tmp_path, "killed")
  assert 8 <= int(resumed["resumed_from"]) < 24
  params = [k for k in full if k.startswith("param/")]
  assert any(k.endswith("/slots") for k in params) and params == [k for k in resumed if k.startswith("param/")]
  for k in params:
    np.testing.assert_allclose(resumed[k], full[k], rtol=1e-6, atol=1e-8, err_msg=k)
  np.testing.assert_allclose(resumed["losses"][-1], full["losses"][-1], rtol=1e-6)
