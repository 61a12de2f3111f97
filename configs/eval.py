r"""Evaluates a trained run (or a Hugging Face checkpoint): exact match of greedy generations on its held-out
split, and task files in the lm-evaluation-harness style (multiple choice, generation with answer
extraction, perplexity, preference pairs, win rates against the reference; see train_lib/eval_tasks.py).

    python main.py --config=configs/eval.py --config.train_workdir=/tmp/sft --workdir=/tmp/sft_eval
    python main.py --config=configs/eval.py --config.hf_path=CKPT --config.eval.tasks=mc:arc.jsonl --workdir=/tmp/ev
"""
import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "eval"
  c.train_workdir = ""
  c.hf_path = ""              # or a Hugging Face checkpoint directory (with its tokenizer)
  c.step = 0                  # 0: the latest checkpoint
  c.eval = common.base_config().eval     # every eval option (configs/common.py)
  c.eval.num_examples = 200
  return c
