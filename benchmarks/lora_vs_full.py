"""LoRA-family SFT against full fine-tuning at the same steps: a base model trained on one built-in task
(`sort`) is fine-tuned on another (`reverse`) with full fine-tuning, LoRA, DoRA and QLoRA (NF4 base).
Writes a markdown table of held-out exact match before/after, the gain relative to full fine-tuning, and the
trainable parameter count.

    python benchmarks/lora_vs_full.py --workdir=/tmp/lvf --out=benchmarks/results/lora_vs_full.md
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

import peft
import train_lib
from benchmarks._common import get_config, train_base, transfer_args

RUNS = (("full fine-tuning", "adapter=none"), ("LoRA r16", "adapter=lora"), ("DoRA r16", "adapter=dora"),
        ("QLoRA r16 (NF4 base)", "adapter=lora,quantize=nf4"), ("LoRA r16, PiSSA init", "adapter=lora,init=pissa"))


def main():
  a = transfer_args("lora_vs_full.md", base_steps=1500, steps=600)
  t0 = time.time()
  base = train_base(a.workdir, a.model, a.base_steps)
  rows = []
  for title, arg in RUNS:
    cfg = get_config("lora.py", f"model={a.model},steps={a.steps},{arg}")
    cfg.model.init_workdir = base
    s = train_lib.train_and_evaluate(cfg, os.path.join(a.workdir, arg.replace(",", "_").replace("=", "-")))
    n_trainable = peft.count(s["state"].params)
    rows.append((title, s["before"]["exact_match"], s["after"]["exact_match"], n_trainable))
  full_gain = rows[0][2] - rows[0][1]
  lines = ["# LoRA family vs full fine-tuning on the built-in task", "",
           f"A {a.model} model trained on `sort` ({a.base_steps} steps) is fine-tuned on `reverse` for {a.steps} "
           "steps (adapters on all linear layers, r=16, alpha=32; lr 3e-3 for adapters, 1e-3 for full). "
           "Exact match: 200 held-out `reverse` prompts, greedy.", "",
           "| run | exact match before | after | gain vs full FT | trainable params |", "|---|---|---|---|---|"]
  for title, b, f, n in rows:
    rel = f"{(f - b) / full_gain:.0%}" if full_gain else "n/a"   # no gain to compare with (too few steps)
    lines.append(f"| {title} | {b:.3f} | {f:.3f} | {rel} | {n:,} |")
  lines += ["", f"Command: `python benchmarks/lora_vs_full.py --workdir=WORKDIR --model={a.model} "
            f"--base_steps={a.base_steps} --steps={a.steps}` ({jax.default_backend()}, {time.time() - t0:.0f} s)."]
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
