"""End to end: the smoke config trains, resumes after SIGKILL exactly, 8 devices and 2 processes equal 1, and a
checkpoint restores onto another process count and mesh."""
import json

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
def test_two_processes_then_eight_devices_on_another_mesh_equal_one_device(tmp_path):
  """Several processes equal one, 8 devices equal 1, and a checkpoint restores elastically: steps 1-3 run
  as 2 JAX processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives; mesh data 2 x fsdp 2
  x tensor 2), steps 4-6 resume their checkpoint in 1 process x 8 devices on another mesh (data 2 x fsdp 4);
  losses and parameters equal a 1-device run of 6 steps."""
  common = {"total_steps": 6, "eval_before": False, "eval.num_examples": 0, "log_every_steps": 1}
  one = _run(tmp_path, "one", {**common, "mesh.data": 1})
  half = train_runner.run_processes(SMOKE, tmp_path / "multi", tmp_path / "half.npz",
                                    {**common, "total_steps": 3, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                     "eval.num_examples": 4},     # generation across processes too
                                    processes=2, devices=4)
  assert int(half["processes"]) == 2 and int(half["devices"]) == 8
  summary = json.load(open(tmp_path / "multi" / "summary.json"))
  assert summary["topology"] == {"process_count": 2, "global_devices": 8, "local_devices": 4,
                                 "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}
  assert 0.0 <= summary["after"]["exact_match"] <= 1.0
  np.testing.assert_allclose(half["losses"], one["losses"][:3], rtol=2e-5)
  eight = _run(tmp_path, "multi", {**common, "mesh.data": 2, "mesh.fsdp": 4}, devices=8)
  assert int(eight["devices"]) == 8 and int(eight["processes"]) == 1 and int(eight["resumed_from"]) == 3
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  _assert_same_params(_params(eight), _params(one), rtol=2e-4)
  # Steps 4-6 changed the parameters (so equality is not trivially true).
  assert max(np.abs(one[k] - half[k]).max() for k in _params(one)) > 1e-3


@pytest.mark.slow
def test_sigkill_of_one_process_then_restart_of_both_resumes_exactly(tmp_path):
  """2 processes x 4 devices; one is SIGKILLed after checkpoint 8 (the other is then killed, as a scheduler
  would); both restarted resume from the last committed checkpoint and end equal to an uninterrupted
  1-device run (losses and parameters)."""
  common = {"total_steps": 24, "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_before": False,
            "eval.num_examples": 0, "async_checkpoints": True}
  multi = {**common, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  one = _run(tmp_path, "one", {**common, "mesh.data": 1})
  train_runner.kill_one_process_after_checkpoint(SMOKE, tmp_path / "multi", tmp_path / "multi.npz", multi, step=8)
  resumed = train_runner.run_processes(SMOKE, tmp_path / "multi", tmp_path / "multi.npz", multi)
  assert 8 <= int(resumed["resumed_from"]) < 24 and int(resumed["processes"]) == 2
  np.testing.assert_allclose(resumed["losses"][-1], one["losses"][-1], rtol=2e-5)
  _assert_same_params(_params(resumed), _params(one), rtol=2e-4)


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
