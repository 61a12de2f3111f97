"""End to end through `train_lib.train_and_evaluate`: the HFT and LIFT configs train and learn the built-in
task (held-out loss well below the untrained model's). LIFT keeps the embeddings and head frozen, as the
reference does, so from a random start it learns less in the same steps."""
import pytest

import train_lib
from configs import hft, lift
from tests.test_sampling_e2e import learned, short_run


@pytest.mark.slow
def test_hft_config_learns(tmp_path):
  config = short_run(hft, interval_steps=25)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  learned(summary, 1.0)


@pytest.mark.slow
def test_lift_config_learns(tmp_path):
  config = short_run(lift)
  config.optim.lift.update_interval = 50       # three re-picks; CPU SVDs are slow
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  learned(summary, 0.3)
