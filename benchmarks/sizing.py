r"""Sizing table: which model fits which mesh with which rematerialisation, from the compiled memory analysis
of the train step (the dry run, `train_lib/dry_run.py`), on 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m benchmarks.sizing [--only llama_1b] [--out benchmarks/results/sizing.md]

For every (model, method, mesh, remat): a global batch of 8 rows x 2048 tokens, bf16 compute with float32
master weights, AdamW; `lora` is LoRA r16 on every linear layer of the blocks. The per-device peak is
arguments + outputs - aliased + temporaries, XLA:CPU's figures for the SPMD-partitioned step: an estimate
for one accelerator of the mesh (no fused attention, CPU layouts), not a measurement. A cell "fits" a GPU
size when that estimate is below it with 10% left for the runtime.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax

import configs.paper as _recipe
from train_lib import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("llama_1b", "llama2_7b", "llama3_8b")
METHODS = ("lora", "full")
MESHES = ((8, 1), (4, 2))           # (fsdp, tensor) over 8 devices
REMATS = ("none", "full")
GPUS_GIB = (24, 40, 80)
BATCH, SEQ = 8, 2048


def config(model: str, method: str, fsdp: int, tensor: int, remat: str):
  c = _recipe.base(model)
  _recipe.gpu_mesh(c, fsdp=fsdp, tensor=tensor)
  c.model.remat = remat
  c.batch_size, c.seq_len, c.total_steps = BATCH, SEQ, 100
  c.optim.name = "adamw"
  if method == "lora":
    c.peft.method, c.peft.targets, c.peft.rank, c.peft.alpha = "lora", "all-linear", 16, 32.0
  return c


def row(model, method, fsdp, tensor, remat) -> dict:
  t = time.perf_counter()
  r = dry_run.dry_run(config(model, method, fsdp, tensor, remat), None, verbose=False)
  m = r["per_device_memory"]
  return {"model": model, "method": method, "fsdp": fsdp, "tensor": tensor, "remat": remat,
          "parameters": r["parameters"], "trainable": r["trainable_parameters"],
          "args_gib": m["argument_size_in_bytes"] / 2**30, "temp_gib": m["temp_size_in_bytes"] / 2**30,
          "peak_gib": m["peak_estimate_bytes"] / 2**30, "compile_s": round(time.perf_counter() - t, 1),
          "devices": jax.device_count(), "backend": jax.default_backend(), "jax": jax.__version__}


def markdown(rows) -> str:
  out = ["| model | method | mesh (fsdp x tensor) | remat | params | per-device args GiB | temp GiB | peak GiB | "
         + " | ".join(f"fits {g} GiB" for g in GPUS_GIB) + " |",
         "|---|---|---|---|---|---|---|---|" + "---|" * len(GPUS_GIB)]
  for r in rows:
    fits = " | ".join("yes" if r["peak_gib"] <= 0.9 * g else "no" for g in GPUS_GIB)
    out.append(f"| {r['model']} | {r['method']} | {r['fsdp']} x {r['tensor']} | {r['remat']} | "
               f"{r['parameters'] / 1e9:.2f}B | {r['args_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | "
               f"{fits} |")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="", help="comma-separated models")
  p.add_argument("--jsonl", default=os.path.join(ROOT, "benchmarks", "results", "sizing.jsonl"))
  p.add_argument("--markdown", action="store_true", help="print the table of --jsonl and exit")
  a = p.parse_args()
  if a.markdown:
    print(markdown([json.loads(l) for l in open(a.jsonl) if l.strip()]))
    return
  if jax.device_count() != 8:
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  models = [m for m in (a.only.split(",") if a.only else MODELS) if m]
  with open(a.jsonl, "a") as f:
    for model, method, (fsdp, tensor), remat in itertools.product(models, METHODS, MESHES, REMATS):
      r = row(model, method, fsdp, tensor, remat)
      print(json.dumps(r), flush=True)
      f.write(json.dumps(r) + "\n")
      f.flush()


if __name__ == "__main__":
  main()
