"""End to end through `train_lib.train_and_evaluate`: the LISA and OwLore configs train, learn the built-in
task (held-out loss well below the untrained model's), and leave the frozen tree as the draws say."""
import ml_collections
import numpy as np
import pytest

import peft
import train_lib
from configs import lisa, owlore
from optim import _sampling as sampling


def short_run(module, arg="model=tiny,smoke", steps=150, **sampling_overrides):
  """The smoke config on a 4-block tiny model, `steps` steps, held-out loss only (no generation)."""
  config = module.get_config(arg)
  config.model.overrides = ml_collections.ConfigDict(dict(num_layers=4))
  config.total_steps = steps
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.eval.num_examples = 0
  config.eval.num_loss_batches = 2
  for k, v in sampling_overrides.items():
    config.sampling[k] = v
  return config


def learned(summary, margin):
  before, after = summary["before"]["loss"], summary["after"]["loss"]
  assert after < before - margin, (before, after)


@pytest.mark.slow
def test_lisa_config_learns(tmp_path):
  config = short_run(lisa, interval_steps=10)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  learned(summary, 1.0)
  last = (config.total_steps - 1) // 10 * 10
  np.testing.assert_array_equal(peft.sampled_blocks(summary["frozen"]),
                                sampling.draw(config.seed, last, np.full(4, 0.25), config.sampling.gamma))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["owlore", "owlore_alpha"])
def test_owlore_config_learns(tmp_path, method):
  config = short_run(owlore, f"model=tiny,smoke,method={method}", steps=150 if method == "owlore" else 60,
                     gamma=2, interval_steps=25)
  config.optim.galore.update_proj_gap = 100     # projectors computed after each draw only: CPU SVDs are slow
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  learned(summary, 1.0 if method == "owlore" else 0.4)
