"""Projected optimizers, layer sampling and sparse fine-tuning against full AdamW at the same steps: a base
model trained on `sort` is fine-tuned on `reverse`. Writes a table of held-out exact match, optimizer-state
bytes, trainable bytes and step time.

    python benchmarks/optimizer_table.py --workdir=/tmp/opt --out=benchmarks/results/optimizers.md
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import train_lib
from benchmarks._common import get_config, train_base, transfer_args

RUNS = (
    ("AdamW (full)", "lora.py", "adapter=none"),
    ("GaLore r32", "galore.py", "opt=galore,rank=32"),
    ("Fira r32", "galore.py", "opt=fira,rank=32"),
    ("FRUGAL (density 0.25)", "galore.py", "opt=frugal"),
    ("LISA (gamma 2 of 4)", "lisa.py", "gamma=2"),
    ("OwLore (gamma 2, GaLore r32)", "owlore.py", "gamma=2,rank=32"),
    ("HFT", "hft.py", ""),
    ("LIFT (rank 8)", "lift.py", "rank=8,filter_rank=16"),
    ("LoRA r16 (for reference)", "lora.py", "adapter=lora"),
)


def nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def step_ms(cfg, workdir: str) -> float:
  """Median train-step time over logging windows (the first window, which compiles, left out)."""
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]
  return cfg.batch_size * cfg.seq_len / statistics.median(tps) * 1e3 if tps else float("nan")


def run_method(cfg_file: str, arg: str, base: str, workdir: str, *, model: str, steps: int, seed: int = 0,
               task: str = "reverse", smoke: bool = False, overrides: dict | None = None) -> dict:
  """Fine-tune `base` on `task` with one config; held-out exact match, state bytes and step time.

  `overrides`: {"dotted.config.key": value} set after the config file's defaults.
  """
  cfg = get_config(cfg_file, ",".join(filter(None, [f"model={model}", arg, "smoke" if smoke else ""])))
  cfg.data.task = task
  cfg.seed = seed
  if not smoke:
    cfg.total_steps = steps
  cfg.model.init_workdir = base
  for key, value in (overrides or {}).items():
    *path, leaf = key.split(".")
    node = cfg
    for k in path:
      node = node[k]
    node[leaf] = value
  s = train_lib.train_and_evaluate(cfg, workdir)
  return dict(exact_match_before=float(s["before"]["exact_match"]), exact_match=float(s["after"]["exact_match"]),
              loss=float(s["after"]["loss"]), opt_state_bytes=nbytes(s["state"].opt_state),
              trainable_bytes=nbytes(s["state"].params), step_ms=step_ms(cfg, workdir))


def main():
  a = transfer_args("optimizers.md", base_steps=1000, steps=400)
  t0 = time.time()
  base = train_base(a.workdir, a.model, a.base_steps)
  rows = []
  for title, cfg_file, arg in RUNS:
    r = run_method(cfg_file, arg, base, os.path.join(a.workdir, title.split(" ")[0].lower()), model=a.model,
                   steps=a.steps)
    rows.append((title, r["exact_match_before"], r["exact_match"], r["opt_state_bytes"], r["trainable_bytes"],
                 r["step_ms"]))
    print(rows[-1], flush=True)
  lines = ["# Optimizers, layer sampling and sparse fine-tuning on the built-in task", "",
           f"A {a.model} model trained on `sort` ({a.base_steps} steps) is fine-tuned on `reverse` for {a.steps} "
           "steps with each method's config (`configs/<name>.py`, lr 3e-3 unless the config says otherwise). "
           "Exact match: 200 held-out prompts, greedy. Bytes: the optimizer state and the trainable tree of the "
           "train state (float32). Step time: median over logging windows (includes host work such as "
           "layer resampling).", "",
           "| method | exact match before | after | optimizer state | trainable | step |",
           "|---|---|---|---|---|---|"]
  for title, b, f, ob, tb, ms in rows:
    lines.append(f"| {title} | {b:.3f} | {f:.3f} | {ob / 2**20:.2f} MiB | {tb / 2**20:.2f} MiB | {ms:.1f} ms |")
  lines += ["", f"Command: `python benchmarks/optimizer_table.py --workdir=WORKDIR --model={a.model} "
            f"--base_steps={a.base_steps} --steps={a.steps}` ({jax.default_backend()}, {time.time() - t0:.0f} s)."]
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
