r"""SFT from scratch on a built-in task with an exact answer (the CPU demo).

    python main.py --config=configs/sft.py --workdir=/tmp/sft
    python main.py --config=configs/sft.py:model=tiny,smoke --workdir=/tmp/sft_smoke
    python main.py --config=configs/sft.py:task=add --config.total_steps=3000 --workdir=/tmp/add

The `small` model (about 2M parameters) learns to sort digit strings: held-out exact match goes from 0 to
well above 0.9 in about 1500 steps on 2 CPU cores (a few minutes).
"""
from configs.common import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", steps=1500, smoke=False)
  c = base_config()
  c.model.name = arg.model
  c.data.task = arg.task
  c.seq_len = 32
  c.batch_size = 64
  c.total_steps = arg.steps
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 100
  if arg.smoke:                            # seconds: tests and CI
    c.total_steps = 8
    c.batch_size = 8
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.optim.warmup_steps = 2
    c.eval.batch_size = 8
    c.eval.num_examples = 8
    c.eval.num_loss_batches = 1
  return c
