r"""LISA: full-weight fine-tuning of gamma decoder blocks at a time, redrawn uniformly every K steps.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/lisa.py --config.model.init_workdir=/tmp/base --workdir=/tmp/lisa
    python main.py --config=configs/lisa.py:gamma=1 --config.sampling.interval_steps=5 \
        --config.model.init_workdir=/tmp/base --workdir=/tmp/lisa_g1
    python main.py --config=configs/lisa.py:model=tiny,smoke --workdir=/tmp/lisa_smoke    # seconds, random base

Pan et al., *LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning*
(arXiv 2403.17919), LMFlow's `lisa_activated_layers=2`, `lisa_interval_steps=20`. The embeddings, final norm
and head always train. The blocks' optimizer state exists for gamma blocks only and restarts with every draw
(`sampling.state=reset`): LMFlow's torch LISA keeps the Adam state of every block ever sampled, which with a
full-rank Adam grows to the full fine-tuning state; `--config.sampling.state=persist` keeps it per block as
LMFlow does, in a store sized for all blocks (`optim/_sampling.py`). Any loss works through the same
trainer (`--config.loss.name=...` with the matching `--config.data.pref_kind`); a preference loss's reference
is a frozen copy of the start weights.
"""
import ml_collections

from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", gamma=2, steps=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  c.sampling = ml_collections.ConfigDict(dict(
      method="lisa",             # lisa | owlore | owlore_alpha | hft (hooks.hook_names())
      gamma=arg.gamma,           # blocks trained at a time (LMFlow default 2)
      interval_steps=20,         # K: steps between draws (LMFlow argparse 20; its run_lisa.sh uses 3)
      prob_mode="uniform",       # uniform | increase | decrease (score-based modes: configs/owlore.py)
      state="reset",             # reset: gamma blocks' state, restarted per draw | persist: LMFlow's, all blocks
  ))
  # The slots need an optimizer of their own: their state, step count included, is theirs per block.
  # `adam` is `adamw` without weight decay (LISA's HF Trainer default is weight_decay=0).
  c.optim.rules = ((r"layers/.*/slots", "adam"), (".*", "adamw"))
  if arg.smoke:
    c.sampling.gamma = 1
    c.sampling.interval_steps = 4          # draws at steps 0 and 4 of the 8
  return c
