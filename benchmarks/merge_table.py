"""Model merging on the built-in tasks: one base, two full fine-tunes on different tasks (`sort` and
`reverse`), merged by every method of `merging` that takes whole models; held-out exact match of each merge
on both tasks. Writes a markdown table (benchmarks/results/merging.md).

    python benchmarks/merge_table.py --workdir=/tmp/mt --out=benchmarks/results/merging.md

The base is trained briefly on an even mixture of `add`, `sort` and `reverse` (`--base_tasks`), so that it
knows the digit format and both target tasks a little: the fine-tunes are then moves from a shared start,
the setting merging methods are made for (`--base_tasks=add`, a base that knows neither task, gave
fine-tunes too far apart for any merge to keep either). The two fine-tunes start from it (full fine-tuning,
same steps). Each merge is scored on held-out prompts of each task (greedy, the task's verifier); "mean" is
the average of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import merging
import synthetic
import train_lib
from benchmarks._common import ROOT, get_config, train_base
from train_lib import build
from train_lib import evaluate as eval_lib

TASKS = ("sort", "reverse")
BASE_TASKS = ("add", "sort", "reverse")


def methods():
  """(row title, method name, base ("base" | "ft0"), models ("both" | "ft1"), parameters)."""
  both = "both"
  return [
      ("linear (uniform soup)", "linear", "base", both, {}),
      ("task arithmetic, lambda 1", "task_arithmetic", "base", both, {}),
      ("task arithmetic, lambda 0.5", "task_arithmetic", "base", both, {"lambda_": 0.5}),
      ("TIES, density 0.5", "ties", "base", both, {"density": 0.5}),
      ("TIES, density 0.2", "ties", "base", both, {"density": 0.2}),
      # lambda 0.5: the scale of averaging two task vectors (TIES' paper picks lambda on validation data)
      ("TIES, density 0.5, lambda 0.5", "ties", "base", both, {"density": 0.5, "lambda_": 0.5}),
      ("TIES, density 0.2, lambda 0.5", "ties", "base", both, {"density": 0.2, "lambda_": 0.5}),
      ("DARE linear, density 0.5, lambda 0.5", "dare_linear", "base", both, {"density": 0.5, "lambda_": 0.5}),
      ("DARE TIES, density 0.5, lambda 0.5", "dare_ties", "base", both, {"density": 0.5, "lambda_": 0.5}),
      ("DARE linear, density 0.5", "dare_linear", "base", both, {"density": 0.5}),
      ("DARE TIES, density 0.5", "dare_ties", "base", both, {"density": 0.5}),
      ("DELLA, density 0.5", "della", "base", both, {"density": 0.5}),
      ("DELLA linear, density 0.5", "della_linear", "base", both, {"density": 0.5}),
      ("breadcrumbs, density 0.9, gamma 0.01", "breadcrumbs", "base", both, {"density": 0.9}),
      ("breadcrumbs TIES, density 0.9, gamma 0.01", "breadcrumbs_ties", "base", both, {"density": 0.9}),
      ("SCE, select_topk 0.5", "sce", "base", both, {"select_topk": 0.5}),
      ("SLERP fine-tune 1 -> 2, t 0.5", "slerp", "ft0", "ft1", {"t": 0.5}),
      ("NuSLERP (task vectors)", "nuslerp", "base", both, {}),
      ("Model Stock", "model_stock", "base", both, {}),
      ("Karcher mean", "karcher", "base", both, {}),
      ("nearswap fine-tune 1 <- 2, t 0.01", "nearswap", "ft0", "ft1", {"t": 0.01}),
      ("PCB, density 0.2", "pcb", "base", both, {"density": 0.2}),
      ("TSV-M", "tsv_m", "base", both, {}),
      ("ComPEFT, density 0.2", "compeft", "base", both, {"density": 0.2}),
  ]


def score(cfgs, model, params, tokenizer) -> list[float]:
  return [eval_lib.exact_match(c, model, params, tokenizer) for c in cfgs]


def mixture_base(workdir: str, model: str, steps: int, tasks, seed: int = 0, smoke: bool = False,
                 n: int = 20_000) -> str:
  """The base trained on an even mixture of `tasks` (reused when `workdir/base` is finished): a model that
  knows the format and each task a little."""
  base = os.path.join(workdir, "base")
  if os.path.exists(os.path.join(base, "summary.json")):
    return base
  os.makedirs(workdir, exist_ok=True)
  for split, size in (("train", n), ("test", 300)):
    records = [r for t in tasks for r in synthetic.generate(t, split, size // len(tasks), seed=0)]
    order = np.random.default_rng(seed).permutation(len(records))
    with open(os.path.join(workdir, f"mixture_{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(records[i]) + "\n" for i in order)
  cfg = get_config("sft.py", f"model={model},steps={steps}" + (",smoke" if smoke else ""))
  cfg.data.source, cfg.data.path, cfg.data.tokenizer = "jsonl", os.path.join(workdir, "mixture_{split}.jsonl"), "char"
  cfg.eval.num_examples = 0
  cfg.seed = seed
  train_lib.train_and_evaluate(cfg, base)
  return base


def fine_tunes(workdir: str, model: str, base_steps: int, steps: int, lr: float, seed: int = 0,
               smoke: bool = False, base_tasks=BASE_TASKS) -> tuple[str, list[str]]:
  """The base (on one task, or an even mixture of `base_tasks`) and its full fine-tunes on each of TASKS
  (workdirs; finished runs are reused)."""
  base_tasks = tuple(base_tasks.split(",") if isinstance(base_tasks, str) else base_tasks)
  if len(base_tasks) == 1:
    base_dir = train_base(workdir, model, base_steps, task=base_tasks[0], seed=seed, smoke=smoke)
  else:
    base_dir = mixture_base(workdir, model, base_steps, base_tasks, seed=seed, smoke=smoke)
  ft_dirs = []
  for task in TASKS:
    d = os.path.join(workdir, f"ft_{task}")
    if not os.path.exists(os.path.join(d, "summary.json")):
      cfg = get_config("sft.py", f"model={model},task={task},steps={steps}" + (",smoke" if smoke else ""))
      cfg.model.init_workdir = base_dir
      cfg.optim.learning_rate = lr
      cfg.optim.warmup_steps = 30 if not smoke else 2
      cfg.eval_before = False
      cfg.seed = seed
      train_lib.train_and_evaluate(cfg, d)
    ft_dirs.append(d)
  return base_dir, ft_dirs


def score_merges(base_dir: str, ft_dirs: list[str], model: str, num_examples: int, only=(), seed: int = 0,
                 table=None) -> list[tuple[str, list[float]]]:
  """[(row title, exact match per task)] for the base, each fine-tune and each merge of `table` (default
  `methods()`, filtered by the names in `only`); `seed` draws the random masks (DARE, DELLA)."""
  cfg, net, base, tokenizer = build.load_trained(base_dir)
  fts = [jax.device_get(build.load_trained(d)[2]) for d in ft_dirs]
  base = jax.device_get(base)
  cfgs = []
  for task in TASKS:
    c = get_config("sft.py", f"model={model},task={task}")
    c.eval.num_examples = num_examples
    cfgs.append(c)
  rows = [("base", score(cfgs, net, base, tokenizer)),
          ("fine-tune 1 (`sort`)", score(cfgs, net, fts[0], tokenizer)),
          ("fine-tune 2 (`reverse`)", score(cfgs, net, fts[1], tokenizer))]
  for r in rows:
    print(r, flush=True)
  for title, name, b, ms, params in (table or methods()):
    if only and name not in only:
      continue
    t1 = time.time()
    merged = merging.get(name)(base if b == "base" else fts[0], fts if ms == "both" else fts[1:], seed=seed,
                               **params)
    rows.append((title, score(cfgs, net, merged, tokenizer)))
    print(rows[-1], f"{time.time() - t1:.0f} s", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "merging.md"))
  p.add_argument("--model", default="small")
  p.add_argument("--base_steps", type=int, default=600)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--num_examples", type=int, default=200)
  p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
  p.add_argument("--only", default="", help="comma-separated method names (default: all)")
  p.add_argument("--base_tasks", default=",".join(BASE_TASKS),
                 help="the base's training: one task, or an even mixture of several")
  a = p.parse_args()
  t0 = time.time()
  base_dir, ft_dirs = fine_tunes(a.workdir, a.model, a.base_steps, a.steps, a.lr, base_tasks=a.base_tasks)
  t_train = time.time() - t0
  rows = score_merges(base_dir, ft_dirs, a.model, a.num_examples, set(filter(None, a.only.split(","))))
  n_merges = len(rows) - 3

  lines = ["# Merging two fine-tunes on the built-in tasks", "",
           f"A {a.model} model trained on {a.base_tasks} ({a.base_steps} steps; several tasks: an even mixture) "
           f"is fine-tuned twice, on `sort` and on "
           f"`reverse` ({a.steps} steps each, full fine-tuning, lr {a.lr:g}); the two fine-tunes are merged by each "
           "method (task vectors relative to the base; SLERP and nearswap interpolate between the two "
           f"fine-tunes). Exact match: {a.num_examples} held-out prompts of each task, greedy, checked by the "
           "task's verifier. Weights are uniform (1 per model); `lambda` 1 unless stated; other parameters at "
           "the defaults of merging/README.md.", "",
           "| model | sort | reverse | mean |", "|---|---|---|---|"]
  for title, (s, r) in rows:
    lines.append(f"| {title} | {s:.3f} | {r:.3f} | {(s + r) / 2:.3f} |")
  lines += ["", f"Command: `python benchmarks/merge_table.py --workdir=WORKDIR --model={a.model} "
            f"--base_tasks={a.base_tasks} --base_steps={a.base_steps} --steps={a.steps} --lr={a.lr:g} "
            f"--num_examples={a.num_examples}` "
            f"({jax.default_backend()}; training {t_train:.0f} s, {n_merges} merges and their evaluation "
            f"{time.time() - t0 - t_train:.0f} s)."]
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
