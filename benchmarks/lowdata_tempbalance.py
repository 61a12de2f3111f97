r"""Low-data TempBalance: held-out exact match and loss with the layerwise learning rates on and off.

    nice -n 10 python benchmarks/lowdata_tempbalance.py                      # the sweep in the results file
    python benchmarks/lowdata_tempbalance.py --sizes=250 --seeds=0 --steps=40 --out=/tmp/tb_try   # a try

For every training-set size (`config.data.train_size`: distinct problems of the built-in task) and seed, it
trains `configs/tempbalance.py` twice with the same steps, data and initialisation: once with TempBalance
(`tempbalance.enabled`, layerwise lr_i = eta_t f_i refreshed from alpha every `esd_interval` steps) and once
without (the alphas are still fitted and logged, so the pair differs only in f). It reports the held-out
exact match and loss of every run, their means over seeds, and writes

    <out>/lowdata_tempbalance.md     the table, the command, the per-run rows
    <out>/lowdata_tempbalance.png    exact match and held-out loss against the training-set size

Model Balancing (Liu et al., EMNLP 2024) reports that alpha-based layerwise rates help most when training
data is scarce; this is a CPU-sized check of that claim, not a reproduction of its numbers. Runs whose
workdir already holds a finished summary are read back, not retrained; a `## Reading` section written by
hand into the markdown is kept when the table is regenerated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="250,1000,4000", help="training problems per run, comma-separated")
  p.add_argument("--seeds", default="0,1", help="model seeds (init and data order), comma-separated")
  p.add_argument("--arms", default="off,off_lr_up,tb,tb_norm", help=f"comma-separated, of {', '.join(ARMS)}")
  p.add_argument("--steps", type=int, default=0, help="train steps per run; 0 = the config's")
  p.add_argument("--lr_up", type=float, default=1.2, help="peak lr factor of the off_lr_up arm")
  p.add_argument("--assign", default="tb_linear_map", help="tb_linear_map | sigmoid | ... (configs/tempbalance.py)")
  p.add_argument("--model", default="small")
  p.add_argument("--task", default="sort")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  p.add_argument("--workroot", default="", help="run workdirs (default: a fresh temporary directory)")
  return p.parse_args(argv)


# off: f = 1 (alphas still fitted and logged); tb: TempBalance; tb_norm: TempBalance with the multipliers
# rescaled to mean 1 over the scheduled matrices (`tb_lr_normalize`; per matrix, not per parameter);
# off_lr_up: the baseline with the peak learning rate times `--lr_up`, a control for "TempBalance just
# raises the average learning rate" (its parameter-weighted mean f is reported per run).
ARMS = ("off", "off_lr_up", "tb", "tb_norm")
LABELS = {"off": "baseline (f = 1)", "off_lr_up": "baseline, peak lr x lr_up", "tb": "TempBalance",
          "tb_norm": "TempBalance, mean f = 1 per matrix"}


def config_for(args, size: int, arm: str, seed: int):
  from configs import tempbalance   # pylint: disable=g-import-not-at-top
  c = tempbalance.get_config(f"model={args.model},task={args.task},assign={args.assign},train_size={size},"
                             f"tb={str(arm in ('tb', 'tb_norm')).lower()}")   # off_lr_up is a baseline: f = 1
  c.tempbalance.normalize = arm == "tb_norm"
  if arm == "off_lr_up":
    c.optim.learning_rate *= args.lr_up
  c.seed = seed
  if args.steps:
    c.total_steps = args.steps
    c.checkpoint_every_steps = args.steps
    c.optim.warmup_steps = max(1, args.steps // 10)
  c.log_every_steps = 25
  c.async_checkpoints = False
  return c


def _multipliers(summary):
  """(min, max, parameter-weighted mean) of the final layerwise LR multipliers, or None without them."""
  import jax   # pylint: disable=g-import-not-at-top
  import optim   # pylint: disable=g-import-not-at-top
  is_lr = lambda x: isinstance(x, optim.ScaleByLayerwiseLrState)
  states = [s for s in jax.tree.leaves(summary["state"].opt_state, is_leaf=is_lr) if is_lr(s)]
  if not states:
    return None
  fs = jax.tree.leaves(states[0].multipliers)
  ps = jax.tree.leaves(summary["state"].params)
  f = np.concatenate([np.ravel(np.asarray(x)) for x in fs])
  # A stacked leaf's f is [L]: each entry covers size / L parameters.
  weighted = sum(float(np.sum(np.asarray(x)) * (np.size(p) / np.size(x))) for x, p in zip(fs, ps))
  return [float(f.min()), float(f.max()), weighted / sum(np.size(p) for p in ps)]


def _alpha_trace(workdir):
  """[(step, mean over blocks of alpha/block_<l>)] from the run's metrics."""
  out = []
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    alphas = [v for k, v in r.items() if k.startswith("alpha/block_")]
    if alphas:
      out.append((r["step"], float(np.mean(alphas))))
  return out


def run_one(args, size, arm, seed, workroot):
  import train_lib   # pylint: disable=g-import-not-at-top
  wd = os.path.join(workroot, f"n{size}_{arm}_s{seed}")
  done = os.path.join(wd, "result.json")
  if os.path.exists(done):
    return json.load(open(done))
  config = config_for(args, size, arm, seed)
  t0 = time.perf_counter()
  summary = train_lib.train_and_evaluate(config, wd)
  after = summary["after"]
  res = dict(size=size, arm=arm, seed=seed, exact_match=float(after["exact_match"]), loss=float(after["loss"]),
             seconds=time.perf_counter() - t0, steps=int(config.total_steps), multipliers=_multipliers(summary),
             alpha_trace=_alpha_trace(wd))
  with open(done, "w") as f:
    json.dump(res, f)
  return res


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def arm_of(run) -> str:
  return run.get("arm") or ("tb" if run.get("tb") else "off")


def aggregate(runs):
  """{(size, arm): dict(em_mean, em_std, loss_mean, loss_std, n)} over seeds."""
  out = {}
  for key in sorted({(r["size"], arm_of(r)) for r in runs}):
    sel = [r for r in runs if (r["size"], arm_of(r)) == key]
    em = np.asarray([r["exact_match"] for r in sel])
    loss = np.asarray([r["loss"] for r in sel])
    out[key] = dict(em_mean=em.mean(), em_std=em.std(), loss_mean=loss.mean(), loss_std=loss.std(), n=len(sel))
  return out


def plot(args, runs, path):
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  agg = aggregate(runs)
  sizes = sorted({s for s, _ in agg})
  colors = {"off": "tab:gray", "off_lr_up": "black", "tb": "tab:red", "tb_norm": "tab:blue"}
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for k, arm in enumerate(a for a in ARMS if any(arm_of(r) == a for r in runs)):
    xs = [s * (1 + 0.03 * (k - 1.5)) for s in sizes if (s, arm) in agg]   # dodge overlapping error bars
    for ax, key, field in zip(axes, ("em", "loss"), ("exact_match", "loss")):
      m = [agg[(s, arm)][f"{key}_mean"] for s in sizes if (s, arm) in agg]
      e = [agg[(s, arm)][f"{key}_std"] for s in sizes if (s, arm) in agg]
      label = LABELS[arm].replace("lr_up", f"{args.lr_up:g}")
      ax.errorbar(xs, m, yerr=e, marker="o", capsize=3, label=label, color=colors[arm])
      pts = [(r["size"] * (1 + 0.03 * (k - 1.5)), r[field]) for r in runs if arm_of(r) == arm]
      ax.plot(*zip(*pts), ".", color=colors[arm], alpha=0.4)
  for ax, title in zip(axes, ("held-out exact match", "held-out loss (nll per token)")):
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training problems (train_size)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def markdown(args, runs, command, wall_s):
  agg = aggregate(runs)
  sizes = sorted({s for s, _ in agg})
  arms = [a for a in ARMS if any(arm_of(r) == a for r in runs)]
  seeds = sorted({r["seed"] for r in runs})
  cell = lambda s, a, k, fmt: (f"{agg[(s, a)][k + '_mean']:{fmt}} ± {agg[(s, a)][k + '_std']:{fmt}}"
                               if (s, a) in agg else "-")
  head = "| train_size | " + " | ".join(f"exact match, {a}" for a in arms) + " | " + " | ".join(
      f"held-out loss, {a}" for a in arms) + " |"
  lines = [head, "|---:" * (1 + 2 * len(arms)) + "|"]
  for s in sizes:
    lines.append(f"| {s} | " + " | ".join(cell(s, a, "em", ".3f") for a in arms) + " | "
                 + " | ".join(cell(s, a, "loss", ".4f") for a in arms) + " |")
  per_run = ["| train_size | seed | arm | exact match | held-out loss | final f: min, max, param-weighted mean "
             "| alpha (mean of blocks) first -> last fit | seconds |",
             "|---:|---:|:---|---:|---:|:---:|:---:|---:|"]
  order = {a: i for i, a in enumerate(ARMS)}
  for r in sorted(runs, key=lambda r: (r["size"], r["seed"], order[arm_of(r)])):
    m = r["multipliers"]
    f = "-" if not m else (f"{m[0]:.2f}, {m[1]:.2f}" + (f", {m[2]:.3f}" if len(m) > 2 else ""))
    tr = r["alpha_trace"]
    a = f"{tr[0][1]:.2f} -> {tr[-1][1]:.2f}" if tr else "-"
    per_run.append(f"| {r['size']} | {r['seed']} | {arm_of(r)} | {r['exact_match']:.3f} "
                   f"| {r['loss']:.4f} | {f} | {a} | {r['seconds']:.0f} |")
  return "\n".join([
      "# Low-data TempBalance on the built-in `sort` task",
      "",
      "Command (from the repo root, 2 shared CPU cores):",
      "",
      "```",
      command,
      "```",
      "",
      f"Setup: `configs/tempbalance.py` (model `{args.model}`: 4 blocks, hidden 192, MLP 512, about 2M "
      f"parameters; task `{args.task}`), {runs[0]['steps']} steps of batch 32, AdamW peak lr 3e-3 with "
      f"warm-up and cosine decay, grad clip 1. Seeds {seeds} (model init and data order; the training "
      "problems of a size are the same for every seed). Arms: "
      + "; ".join(f"`{a}` = {LABELS[a].replace('lr_up', f'{args.lr_up:g}')}" for a in arms) + f". TempBalance: `assign={args.assign}`, alpha by "
      "the median xmin rule (`EsdConfig.tempbalance`), refreshed every 25 steps from step 0, the first and "
      "last analysed matrix in network order (block 0's q_proj, lm_head) left at f = 1, embeddings and norms "
      "at f = 1. `eigs_thresh` is lowered from the references' 50 to 32 so that the k/v projections "
      "(192 x 64, N = 64) are analysed: the 28 projection slices and lm_head are fitted, 27 scheduled. Held-out: 256 problems that are in no training set "
      "(exact match of greedy generations) and 4 x 64 for the loss. Mean ± std over seeds; "
      f"sum of run times {wall_s / 60:.1f} min (the CPU was shared with other jobs).",
      "",
      *lines,
      "",
      "![exact match and loss against training size](lowdata_tempbalance.png)",
      "",
      "Per run:",
      "",
      *per_run,
      "",
  ])


READING = "\n## Reading"


def main(argv=None):
  args = parse_args(argv)
  import jax   # pylint: disable=g-import-not-at-top
  workroot = args.workroot or tempfile.mkdtemp(prefix="lowdata_tb_")
  os.makedirs(workroot, exist_ok=True)
  # Every run compiles the same step: reuse the executables across runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workroot, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  sizes = [int(s) for s in args.sizes.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  arms = args.arms.split(",")
  for a in arms:
    if a not in ARMS:
      raise ValueError(f"--arms: {a!r}; valid: {ARMS}")
  t0 = time.perf_counter()
  runs = []
  for seed in seeds:
    for size in sizes:
      for arm in arms:
        r = run_one(args, size, arm, seed, workroot)
        runs.append(r)
        print(f"[lowdata_tb] size={size} seed={seed} arm={arm}: exact_match {r['exact_match']:.3f} "
              f"loss {r['loss']:.4f} ({r['seconds']:.0f} s, total {(time.perf_counter() - t0) / 60:.1f} min)",
              flush=True)
  wall = sum(r["seconds"] for r in runs)
  os.makedirs(args.out, exist_ok=True)
  plot(args, runs, os.path.join(args.out, "lowdata_tempbalance.png"))
  command = "nice -n 10 .venv/bin/python benchmarks/lowdata_tempbalance.py " + " ".join(
      f"--{k}={v}" for k, v in (("sizes", args.sizes), ("seeds", args.seeds), ("arms", args.arms),
                                ("lr_up", args.lr_up), ("assign", args.assign))) + (f" --steps={args.steps}" if args.steps else "")
  md = markdown(args, runs, command, wall)
  md_path = os.path.join(args.out, "lowdata_tempbalance.md")
  if os.path.exists(md_path):            # the hand-written reading of an earlier run survives a rerun
    old = open(md_path).read()
    if READING in old:
      md += old[old.index(READING):]
  with open(md_path, "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
