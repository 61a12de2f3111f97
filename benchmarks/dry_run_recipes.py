r"""Full-size dry runs of every paper recipe: parameters, optimizer state, the compiled step's per-device
memory and FLOPs on the recipe's mesh over 8 simulated CPU devices; writes
benchmarks/results/paper_recipes_dry_run.md.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m benchmarks.dry_run_recipes [--only galore_c4:size=1b,lisa] [--no_compile]

The memory and FLOPs are XLA:CPU's for the SPMD-partitioned step (no fused attention, CPU layouts): an
estimate of what one accelerator of an 8-device mesh holds, not a measurement on one.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax

import configs.paper as _recipe
from train_lib import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="")
  p.add_argument("--no_compile", action="store_true")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "paper_recipes_dry_run.md"))
  a = p.parse_args()
  specs = [s for s in (a.only.split(",") if a.only else _recipe.RECIPES) if s]
  rows = []
  for spec in specs:
    t = time.perf_counter()
    r = dry_run.dry_run(_recipe.load(spec), None, verbose=False, compile_step=not a.no_compile)
    r["seconds"] = time.perf_counter() - t
    rows.append((spec, r))
    print(spec, json.dumps({k: r.get(k) for k in ("parameters", "trainable_parameters", "optimizer_state_bytes",
                                                   "flops_per_step", "per_device_memory", "seconds")}), flush=True)
  g = lambda n: f"{n / 2**30:.2f}"
  lines = ["# Paper recipes: full-size dry runs", "",
           f"`python -m benchmarks.dry_run_recipes` on {jax.device_count()} simulated {jax.devices()[0].platform} "
           "devices (XLA:CPU's memory and FLOPs of the SPMD-partitioned step: an estimate for one device of "
           "the mesh, not an accelerator measurement). GiB; FLOPs per step per device.", "",
           "| recipe | mesh (data, fsdp, tensor) | params | trainable | optimizer state GiB | per-device args GiB "
           "| per-device temp GiB | FLOPs/step | steps |",
           "|---|---|---|---|---|---|---|---|---|"]
  for spec, r in rows:
    if r.get("task") == "merge":
      lines.append(f"| {spec} | - | {r['parameters']:,} | - | - | whole-tree f32 {g(r['whole_tree_float32_bytes'])} "
                   f"| streaming f32 {g(r['streaming_float32_bytes_per_tensor'])} | - | - |")
      continue
    m = r.get("per_device_memory") or {}
    mesh = r["mesh"]
    lines.append(
        f"| {spec} | {mesh.get('data')}, {mesh.get('fsdp')}, {mesh.get('tensor')} | {r['parameters']:,} | "
        f"{r['trainable_parameters']:,} | {g(r['optimizer_state_bytes'])} | "
        f"{g(m.get('argument_size_in_bytes', 0)) if m else '-'} | {g(m.get('temp_size_in_bytes', 0)) if m else '-'} | "
        f"{r.get('flops_per_step', float('nan')):.3e} | {r['total_steps']:,} |")
  stand = sorted({s for _, r in rows for s in r.get("stand_ins", [])})
  if stand:
    lines += ["", "Stand-ins (shape-identical): " + "; ".join(stand)]
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
