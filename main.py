r"""Entry point: dispatches on config.task.

    python main.py --config=configs/sft.py --workdir=/tmp/sft [--config.total_steps=500 ...]
"""
from absl import app, flags, logging
from ml_collections import config_flags

import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:   # orbax and absl are chatty at INFO; --verbosity=0 brings it back
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", FLAGS.config)
  train_lib.run_task(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
