"""OwLore killed mid-run (SIGKILL) and restarted from its workdir equals the uninterrupted run: the frozen
tree (written back at every draw) is checkpointed, and draws are a function of (seed, step)."""
import numpy as np
import pytest

from tests import train_runner

SMOKE = "configs/owlore.py:model=tiny,smoke"
COMMON = {"total_steps": 24, "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_before": False,
          "eval.num_examples": 0, "async_checkpoints": True, "sampling.interval_steps": 6,
          "optim.galore.update_proj_gap": 3, "model.overrides": {"num_layers": 3}}


@pytest.mark.slow
def test_owlore_resume_after_sigkill_equals_uninterrupted(tmp_path):
  full = train_runner.run(SMOKE, tmp_path / "full", tmp_path / "full.npz", COMMON)
  # Step 8 is saved: the run is past its second draw (step 6) and mid-way through a projector period.
  train_runner.kill_after_checkpoint(SMOKE, tmp_path / "killed", tmp_path / "killed.npz", COMMON, step=8)
  resumed = train_runner.run(SMOKE, tmp_path / "killed", tmp_path / "killed.npz", COMMON)
  assert 8 <= int(resumed["resumed_from"]) < 24
  params = [k for k in full if k.startswith("param/")]
  assert any(k.endswith("/slots") for k in params) and params == [k for k in resumed if k.startswith("param/")]
  for k in params:
    np.testing.assert_allclose(resumed[k], full[k], rtol=1e-6, atol=1e-8, err_msg=k)
  np.testing.assert_allclose(resumed["losses"][-1], full["losses"][-1], rtol=1e-6)
