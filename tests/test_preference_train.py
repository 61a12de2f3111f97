"""Preference runs through the trainer: loss state carried between steps (BCO), loss/data kind checks."""
import json
import os

import pytest

import train_lib
from configs import dpo
from train_lib import validate


def test_bco_running_reward_mean_is_carried_and_checkpointed(tmp_path):
  config = dpo.get_config("model=tiny,smoke,loss=bco,kind=unpaired")
  config.eval_before = False
  config.log_every_steps = 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  recs = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  steps = [r["bco/steps"] for r in recs if "bco/steps" in r and "eval/loss" not in r]
  assert steps == [float(i) for i in range(1, 9)]      # the running mean counts every step, not just one
  data_state = json.load(open(os.path.join(tmp_path, "checkpoints", "8", "data", "metadata")))
  assert data_state["loss_carry"]["bco_steps"] == 8.0


@pytest.mark.parametrize("loss,kind", [("dpo", None), ("nll", "pairwise"), ("lipo", "unpaired"), ("kto", "pairwise")])
def test_loss_kind_must_match_the_data(loss, kind):
  config = dpo.get_config("model=tiny,smoke")
  config.loss.name = loss
  config.data.pref_kind = kind
  with pytest.raises(validate.ConfigError, match="loss but config.data.pref_kind is"):
    validate.validate(config)


def test_kernel_divergence_selection_scores_every_pair_and_picks_the_best(tmp_path):
  from configs import dpo_kernels
  config = dpo_kernels.get_config("model=tiny,smoke,select")
  # Two cells (each a short training run): enough to show that every pair is scored and the best is picked.
  config.sweep.grid = (("loss.kernel", ("rbf", "polynomial")), ("loss.divergence", ("kl",)))
  config.eval.num_examples = 0
  table, best = train_lib.run_task(config, str(tmp_path))
  assert {(k, d) for k, d, _ in table} == {("rbf", "kl"), ("polynomial", "kl")}
  scores = [s for _, _, s in table]
  assert scores == sorted(scores, reverse=True) and best == table[0][:2]
  assert "rbf" in open(os.path.join(tmp_path, "selection.md")).read()
