"""Does DPO-Kernels' data-driven selection (losses/_kernel_selection.py, our reading of the paper's metrics)
pick a (kernel, divergence) pair that the sweep of short training runs ranks in its top third?

Per built-in task: SFT once (the starting model); then per seed: the `preselect` task (no training) picks
a pair, and the `sweep` task trains every one of the 28 pairs for a few steps from the same start and
ranks them by held-out `rewards/margins`. Chance of a top-third rank (9 of 28) is 9/28 = 0.32.

    python benchmarks/kernel_selection.py --workdir=/tmp/ksel --out=benchmarks/results/kernel_selection.md
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import data as data_lib
import losses
import optim
import train_lib
from benchmarks._common import ROOT, get_config
from train_lib import build
from train_lib import evaluate as eval_lib
from train_lib import sharding as shd
from train_lib import train as trainer


def one_compile_sweep(config, workdir: str):
  """What the `sweep` task computes for `config.sweep.grid` (kernel x divergence), with one compiled train
  step for all 28 pairs: the loss is `lax.switch` over the pairs' configs on a `pair_index` carried in the
  batch, so on a slow CPU the sweep costs 28 x (steps + eval) instead of 28 compilations. Same trainer step,
  start, data order, optimizer and held-out metric as the task; checked against it by `--check_task`.
  Returns rows (kernel, divergence, score) best first, like the task."""
  sw = config.sweep
  (k_key, kernels), (d_key, divergences) = sw.grid
  assert (k_key, d_key) == ("loss.kernel", "loss.divergence"), sw.grid
  pairs = [(k, d) for k in kernels for d in divergences]
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.total_steps = sw.steps
  cfg = build.with_defaults(cfg)
  entry = losses.get(cfg.loss.name)
  pair_cfgs = []
  for k, d in pairs:
    c = copy.deepcopy(cfg.loss)
    with c.unlocked():
      c.kernel, c.divergence = k, d
    pair_cfgs.append(c)

  def switched(policy, reference, batch, loss_cfg):
    del loss_cfg
    rest = {k: v for k, v in batch.items() if k != "pair_index"}
    branches = [functools.partial(lambda c, ops: entry.fn(*ops, c), c) for c in pair_cfgs]
    return jax.lax.switch(batch["pair_index"], branches, (policy, reference, rest))

  loss_entry = dataclasses.replace(entry, fn=switched)
  mesh = shd.make_mesh(cfg.get("mesh"))
  tokenizer = data_lib.get_tokenizer(cfg.data)
  model, params0 = build.build_model(cfg, tokenizer, mesh)
  params0, _ = build.transform_params(cfg, model, params0)
  trainable0, frozen = build.split_trainable(params0)
  tx, schedule = optim.from_config(cfg, trainable0)
  step_fn = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, schedule=schedule,
                                      loss_entry=loss_entry, loss_cfg=cfg.loss))
  eval_fn = jax.jit(functools.partial(trainer.eval_step, model=model, loss_entry=loss_entry, loss_cfg=cfg.loss))
  # Every pair sees the same batches, as every run of the task does (same seed): made once here.
  it = iter(data_lib.get_dataset(cfg.data, "train", tokenizer=tokenizer, batch_size=cfg.batch_size,
                                 seq_len=int(cfg.seq_len), seed=cfg.seed))
  train_batches = [eval_lib.put_batch(eval_lib.to_model_batch(next(it)), mesh) for _ in range(int(sw.steps))]
  eval_batches = []
  eval_ds = data_lib.get_dataset(cfg.data, cfg.get("eval_split", "test"), tokenizer=tokenizer,
                                 batch_size=cfg.eval.batch_size, seq_len=int(cfg.seq_len), seed=cfg.seed)
  for j, b in enumerate(eval_ds):
    if j >= cfg.eval.get("num_loss_batches", 4):
      break
    eval_batches.append(b)
  rows = []
  for i, pair in enumerate(pairs):
    idx = jnp.asarray(i, jnp.int32)
    state = build.init_state(tx, trainable0, cfg.seed)
    for batch in train_batches:
      state, _ = step_fn(state, frozen, None, {**batch, "pair_index": idx})
    # eval_lib.heldout_loss's average, over the cached held-out batches.
    total, weight = 0.0, 0.0
    for b in eval_batches:
      m = jax.device_get(eval_fn(state.params, frozen, None,
                                 {**eval_lib.put_batch(eval_lib.to_model_batch(b), mesh), "pair_index": idx}))
      w = float(np.sum(b["example_mask"])) if "example_mask" in b else 1.0
      total, weight = total + w * float(m[sw.metric]), weight + w
    rows.append((*pair, total / max(weight, 1e-9)))
    print(f"sweep {pair}: {rows[-1][-1]:.6f}", flush=True)
  higher = sw.get("higher_is_better", True)
  rows.sort(key=lambda r: -r[-1] if higher else r[-1])
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(rows, f)
  return rows, rows[0][:-1]


def _sweep_config(a, task: str, seed: int, sft_dir: str):
  c = get_config("dpo_kernels.py", f"model={a.model},task={task},smoke")
  c.seed = seed
  c.model.init_workdir = sft_dir
  c.batch_size = a.batch_size
  c.eval.num_examples = 0                  # no generation: the sweep's metric is a held-out loss metric
  c.eval.num_loss_batches = a.eval_batches
  c.eval.batch_size = a.batch_size
  c.sweep.steps = a.steps
  c.optim.warmup_steps = 1
  c.log_every_steps = a.steps
  c.selection.num_batches = a.select_batches
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernel_selection.md"))
  p.add_argument("--model", default="tiny")
  p.add_argument("--tasks", default="sort,reverse,add")
  p.add_argument("--seeds", default="0")
  p.add_argument("--sft_steps", type=int, default=150)
  p.add_argument("--steps", type=int, default=10, help="training steps per pair in the sweep")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--select_batches", type=int, default=8)
  p.add_argument("--check_task", default="",
                  help="kernel,divergence: also run the `sweep` task's own training for this pair and report both")
  p.add_argument("--exact_task", action="store_true", help="run the `sweep` task itself (28 compilations)")
  p.add_argument("--report_only", action="store_true", help="rewrite --out from WORKDIR/kernel_selection.json")
  a = p.parse_args()
  t0 = time.time()
  if a.report_only:
    with open(os.path.join(a.workdir, "kernel_selection.json")) as f:
      saved = json.load(f)
    if isinstance(saved, list):     # written by a run in progress: the results only
      saved = {"results": saved, "seconds": float("nan")}
    _write(a, saved["results"], saved["seconds"])
    return
  results = []
  for task in a.tasks.split(","):
    sft_dir = os.path.join(a.workdir, task, "sft")
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
      c = get_config("sft.py", f"model={a.model},task={task},steps={a.sft_steps}")
      c.eval.num_examples = 0
      train_lib.train_and_evaluate(c, sft_dir)
    for seed in (int(s) for s in a.seeds.split(",")):
      wd = os.path.join(a.workdir, task, f"seed{seed}")
      cfg = _sweep_config(a, task, seed, sft_dir)
      t1 = time.time()
      done = os.path.join(wd, "preselect", "preselect.json")
      if os.path.exists(done) and not a.exact_task:     # a finished (task, seed) of an earlier call
        with open(done) as f:
          stats = json.load(f)
      else:
        stats = train_lib.TASKS["preselect"](cfg, os.path.join(wd, "preselect"))
      t_select = time.time() - t1
      pick = (stats["best"]["kernel"], stats["best"]["divergence"])
      t1 = time.time()
      done = os.path.join(wd, "sweep", "sweep.json")
      if os.path.exists(done) and not a.exact_task:
        with open(done) as f:
          rows = [tuple(r) for r in json.load(f)]
      else:
        sweep = train_lib.TASKS["sweep"] if a.exact_task else one_compile_sweep
        rows, _ = sweep(cfg, os.path.join(wd, "sweep"))
      t_sweep = time.time() - t1
      order = [tuple(r[:2]) for r in rows]
      rank = order.index(pick) + 1
      results.append({"task": task, "seed": seed, "pick": list(pick), "rank": rank, "n": len(rows),
                      "default_rank": order.index(("rbf", "kl")) + 1,
                      "sweep_best": list(order[0]), "sweep": [list(r) for r in rows],
                      "select_s": t_select, "sweep_s": t_sweep})
      if a.check_task and len(results) == 1:
        k, d = a.check_task.split(",")
        c2 = copy.deepcopy(cfg)
        c2.sweep.grid = (("loss.kernel", (k,)), ("loss.divergence", (d,)))
        task_rows, _ = train_lib.TASKS["sweep"](c2, os.path.join(wd, "task_check"))
        results[-1]["check"] = {"pair": [k, d], "task": task_rows[0][-1],
                                "one_compile": {(r[0], r[1]): r[2] for r in rows}[(k, d)]}
      print(json.dumps(results[-1], default=float), flush=True)
      _write(a, results, time.time() - t0)


def _axis_rank(rows, axis: int, value: str) -> tuple[int, int]:
  """(rank of `value` among the values of `axis` by its mean sweep score over the other axis, how many)."""
  means = {}
  for r in rows:
    means.setdefault(r[axis], []).append(r[-1])
  order = sorted(means, key=lambda v: -sum(means[v]) / len(means[v]))
  return order.index(value) + 1, len(order)


def sw_name(a):
  return "the `sweep` task" if a.exact_task else "one-compile sweep"


def _write(a, results, seconds):
  n = results[0]["n"]
  third = n // 3
  hits = sum(r["rank"] <= third for r in results)
  lines = [
      "# DPO-Kernels: data-driven selection vs the sweep",
      "",
      "The metric selector (`select_by=metrics`, losses/_kernel_selection.py: kernel = argmax KS, divergence"
      " = argmax PND, computed from the SFT model's outputs before training; our reading of the paper's"
      " metrics) against the sweep (`select_by=sweep`: each of the 28 pairs trained from the same SFT model,"
      " ranked by held-out `rewards/margins`; mode dpo_compatible, policy_hidden embeddings).",
      "",
      f"Settings: model {a.model}, SFT {a.sft_steps} steps per task; sweep {a.steps} LoRA steps per pair at"
      f" batch {a.batch_size}, scored on {a.eval_batches} held-out batches of {a.batch_size} pairs;"
      f" statistics over {a.select_batches} training batches ({a.select_batches * a.batch_size} pairs).",
      "",
      "| task | seed | metric pick | its sweep rank (of 28) | top third? | (rbf, kl) default's rank | sweep best |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(f"| {r['task']} | {r['seed']} | {r['pick'][0]}, {r['pick'][1]} | {r['rank']} "
                 f"| {'yes' if r['rank'] <= third else 'no'} | {r['default_rank']} "
                 f"| {r['sweep_best'][0]}, {r['sweep_best'][1]} |")
  k = len(results)
  # One-sided binomial tail P(X >= hits) under chance p = third / n.
  p = third / n
  tail = sum(math.comb(k, i) * p ** i * (1 - p) ** (k - i) for i in range(hits, k + 1))
  lines += ["", "Per axis (the rule chooses each axis on its own): the picked kernel's rank among the kernels by"
            " its mean sweep score over the divergences, the picked divergence's among the divergences by its"
            " mean over the kernels, and the range of the 28 sweep scores.", "",
            "| task | seed | kernel rank (of 4) | divergence rank (of 7) | sweep scores min .. max |",
            "|---|---|---|---|---|"]
  for r in results:
    kr, kn = _axis_rank(r["sweep"], 0, r["pick"][0])
    dr, dn = _axis_rank(r["sweep"], 1, r["pick"][1])
    scores = [row[-1] for row in r["sweep"]]
    lines.append(f"| {r['task']} | {r['seed']} | {kr} | {dr} | {min(scores):.4f} .. {max(scores):.4f} |")
  for r in results:
    if "check" in r:
      ch = r["check"]
      lines += ["", f"The one-compile sweep against the `sweep` task's own training ({r['task']}, seed {r['seed']},"
                f" pair {ch['pair'][0]}, {ch['pair'][1]}): {sw_name(a)} {ch['one_compile']:.6f} vs task"
                f" {ch['task']:.6f}."]
  lines += [
      "",
      f"Top-third rate: {hits}/{k} = {hits / k:.2f} (chance {third}/{n} = {p:.2f}; one-sided binomial "
      f"P(X >= {hits}) under chance = {tail:.2f}). Mean rank of the pick: "
      f"{sum(r['rank'] for r in results) / k:.1f} (chance {(n + 1) / 2:.1f}).",
      "",
      f"Command: `python benchmarks/kernel_selection.py --workdir=WORKDIR --model={a.model} --tasks={a.tasks}"
      f" --seeds={a.seeds} --sft_steps={a.sft_steps} --steps={a.steps} --batch_size={a.batch_size}"
      f" --eval_batches={a.eval_batches} --select_batches={a.select_batches}` ({jax.default_backend()},"
      f" {seconds:.0f} s in all).",
  ]
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(a.workdir, "kernel_selection.json"), "w") as f:
    json.dump({"results": results, "seconds": seconds}, f, indent=2, default=float)
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main()
