r"""Evaluates a trained run: exact match of greedy generations on its held-out split.

    python main.py --config=configs/eval.py --config.train_workdir=/tmp/sft --workdir=/tmp/sft_eval
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "eval"
  c.train_workdir = ""
  c.step = 0                  # 0: the latest checkpoint
  c.eval = ml_collections.ConfigDict(dict(num_examples=200, batch_size=64, max_new_tokens=16))
  return c
