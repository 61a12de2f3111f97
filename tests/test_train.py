"""End to end: the smoke config trains, resumes after SIGKILL exactly, and 8 devices equal 1."""
import numpy as np
import pytest

from tests import train_runner

SMOKE = "configs/sft.py:model=tiny,smoke"


def _run(tmp_path, name, overrides, devices=1):
  return train_runner.run(SMOKE, tmp_path / name, tmp_path / f"{name}.npz", overrides, devices=devices)


def _params(res):
  return {k: v for k, v in res.items() if k.startswith("param/")}


def _assert_same_params(a, b, rtol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)


@pytest.mark.slow
def test_eight_simulated_devices_equal_one(tmp_path):
  common = {"total_steps": 6, "eval_before": False, "eval.num_examples": 0}
  one = _run(tmp_path, "one", {**common, "mesh.data": 1})
  eight = _run(tmp_path, "eight", {**common, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, devices=8)
  assert int(eight["devices"]) == 8 and int(one["devices"]) == 1
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  _assert_same_params(_params(eight), _params(one), rtol=2e-4)
  # The run changed the parameters (so equality is not trivially true).
  init = _run(tmp_path, "init", {**common, "total_steps": 1, "optim.learning_rate": 1e-12})
  diff = max(np.abs(one[k] - init[k]).max() for k in _params(one))
  assert diff > 1e-3


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  common = {"total_steps": 40, "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_before": False,
            "eval.num_examples": 0, "async_checkpoints": True}
  full = _run(tmp_path, "full", common)

  train_runner.kill_after_checkpoint(SMOKE, tmp_path / "killed", tmp_path / "killed.npz", common, step=8)

  resumed = _run(tmp_path, "killed", common)
  assert 8 <= int(resumed["resumed_from"]) < 40
  _assert_same_params(_params(resumed), _params(full), rtol=1e-6)
  np.testing.assert_allclose(resumed["losses"][-1], full["losses"][-1], rtol=1e-6)
