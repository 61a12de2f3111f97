"""DPO-Kernels' data-driven selection: a short run per (kernel, divergence) pair from the same start, each
scored on the validation split; prints and writes the table, best first.

    python main.py --config=configs/dpo_kernels.py:select --config.model.init_workdir=/tmp/sft --workdir=/tmp/sel

The paper's named selection metrics are unverified (METHODS.md A2), so the score is what
`config.select.metric` names in the held-out evaluation (default `rewards/margins`; `exact_match` works too).
"""
from __future__ import annotations

import copy
import os

import losses
from train_lib import train as train_mod


def select_kernels(config, workdir: str):
  sel = config.select

  def score(kernel: str, divergence: str) -> float:
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.task = "train"
      cfg.loss.kernel, cfg.loss.divergence = kernel, divergence
      cfg.total_steps = sel.steps
      cfg.eval_before = False
      cfg.checkpoint_every_steps = sel.steps
    summary = train_mod.train_and_evaluate(cfg, os.path.join(workdir, f"{kernel}_{divergence}"))
    return summary["after"][sel.metric]

  table, best = losses.select_kernel_divergence(score, tuple(sel.kernels), tuple(sel.divergences),
                                                higher_is_better=sel.get("higher_is_better", True))
  text = losses.format_selection_table(table)
  print(text, flush=True)
  with open(os.path.join(workdir, "selection.md"), "w") as f:
    f.write(f"metric: {sel.metric} after {sel.steps} steps; best: {best}\n\n{text}\n")
  return table, best
