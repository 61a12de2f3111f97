r"""HFT (Half Fine-Tuning): full fine-tuning in which each stage freezes a random half of the weight matrices.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/hft.py --config.model.init_workdir=/tmp/base --workdir=/tmp/hft
    python main.py --config=configs/hft.py:model=tiny,smoke --workdir=/tmp/hft_smoke      # seconds, random base

Hui et al., *HFT: Half Fine-Tuning for Large Language Models* (arXiv 2404.18466). No official code: the
selection rule (2 of 4 attention matrices per block; 2 of 3 MLP matrices in half the blocks, 1 of 3 in the
rest) is METHODS C5's, redrawn every `interval_steps` steps (`optim/_hft.py`). Frozen matrices get zero
updates and keep their Adam state; gradient clipping runs inside the HFT transform on the trained half.
"""
import ml_collections

from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", steps=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  c.sampling = ml_collections.ConfigDict(dict(
      method="hft",
      interval_steps=100,        # steps per stage (one mask); the paper's stage length is not published
  ))
  c.optim.name = "hft"                       # holds the per-stage mask around the inner optimizer
  c.optim.hft.inner = "adamw"                # its options: config.optim.adamw
  c.optim.hft.clip_norm = c.optim.grad_clip_norm   # clip the trained half only ...
  c.optim.grad_clip_norm = 0.0                     # ... not the full gradient before the mask
  if arg.smoke:
    c.sampling.interval_steps = 4
  return c
