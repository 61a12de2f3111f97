"""OwLore's 7B training-step memory in OwLore's own setting, from XLA's compiled memory analysis.

    python benchmarks/owlore_memory.py        # env: SIZE=7b CASES=persist:16x512,reset:16x512,reset:4x1024

Nothing is allocated: the Llama-2-7B parameter tree (bf16), the slot nodes, the optimizer state and the
batch are abstract (`jax.eval_shape`, `jax.ShapeDtypeStruct`); the trainer's jitted step
(`train_lib.train_step`, donated state) is lowered and compiled for the local backend, and
`compiled.memory_analysis()` gives the sizes of its arguments, outputs, aliased (donated) buffers and
temporaries. The config is `configs/owlore.py:preset=paper` (gamma 5 of 32 blocks, GaLore rank 256, gap
100, bf16 weights and compute, every layer rematerialised, embeddings / final norm / head with AdamW) at the
batch of each case. `state=persist` holds the optimizer state of all 32 blocks (the bound that OwLore's
torch state reaches once every block has been drawn; here it is allocated from step 0); `reset` holds it
for the 5 sampled blocks only.

Printed per case (one JSON line): the bytes of the frozen tree, the trainable tree and the optimizer state
(from the abstract trees), XLA's argument / output / alias / temp sizes, and
`peak_GiB = argument + output - alias + temp`, the step's live memory as XLA's buffer assignment accounts
it (the frozen weights, the donated state updated in place, the batch and the step's temporaries).

With `DUMP=DIR` XLA writes its buffer assignment there and `f32_weight_stacks_GiB` sums the temporaries
that are float32 copies of whole bf16 weight stacks `[L, in, out]`: XLA:CPU has no bf16 dot, upcasts its
operands and hoists the conversion of the stacked kernels out of the layer loop; a GPU or TPU runs bf16 dots
natively and never builds them, so `peak_GiB - f32_weight_stacks_GiB` is the nearer figure for those.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("DUMP"):      # before jax starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={os.environ['DUMP']}"
                             " --xla_dump_hlo_module_re=.*train_step.*")

import jax
import jax.numpy as jnp
import numpy as np

import losses
import models
import optim
import peft
import train_lib
from configs import owlore as owlore_config

SIZES = {"tiny": "bench_tiny", "1b": "llama_1b", "7b": "llama2_7b"}
GIB = 2.0 ** 30


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def f32_weight_stacks(dump_dir: str, num_blocks: int, kernel_shapes) -> float:
  """GiB of the buffers of the newest memory-usage report that hold an f32 copy of a whole weight stack."""
  reports = sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")), key=os.path.getmtime)
  stacks = {f"f32[{num_blocks},{i},{o}]" for i, o in kernel_shapes}
  total = 0.0
  for line in open(reports[-1]).read().splitlines():
    parts = [p.strip() for p in line.split(";")]
    if len(parts) == 5 and any(s in stacks for s in re.findall(r"f32\[[\d,]+\]", parts[4])):
      size, unit = re.fullmatch(r"([\d.]+)\s*(GiB|MiB|KiB|B)", parts[1]).groups()
      total += float(size) / {"GiB": 1, "MiB": 2**10, "KiB": 2**20, "B": 2**30}[unit]
  return total


def measure(preset: str, state_mode: str, B: int, T: int) -> dict:
  config = owlore_config.get_config(f"preset=paper,model={preset}")
  config.sampling.state = state_mode
  config.total_steps = 1000
  mc = config.model
  cfg = models.preset(preset, dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat)
  model = models.Decoder(cfg)
  gamma = config.sampling.gamma
  params = jax.eval_shape(lambda: peft.sample_layers(model.init(jax.random.PRNGKey(0)), np.arange(gamma)))
  trainable, frozen = jax.eval_shape(peft.split, params)
  tx, schedule = optim.from_config(config, trainable)
  state = jax.eval_shape(lambda t: train_lib.TrainState(jnp.zeros((), jnp.int32), t, tx.init(t),
                                                        jax.random.PRNGKey(1)), trainable)
  spec = lambda dtype: jax.ShapeDtypeStruct((B, 1, T), dtype)
  batch = {"inputs": spec(jnp.int32), "targets": spec(jnp.int32), "loss_mask": spec(jnp.float32),
           "positions": spec(jnp.int32), "segment_ids": spec(jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=losses.get("nll"), loss_cfg=config.loss), donate_argnums=(0,))
  ma = step.lower(state, frozen, None, batch).compile().memory_analysis()
  arg, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                           ma.temp_size_in_bytes)
  extra = {}
  if os.environ.get("DUMP"):
    shapes = {tuple(x.shape[1:]) for p, x in peft.flatten(frozen).items()
              if p.startswith("layers/") and p.endswith("kernel/base")}
    stacks = f32_weight_stacks(os.environ["DUMP"], cfg.num_layers, shapes)
    extra = dict(f32_weight_stacks_GiB=round(stacks, 3),
                 peak_without_f32_stacks_GiB=round((arg + out - alias + temp) / GIB - stacks, 3))
  return dict(size=preset, state=state_mode, gamma=gamma, num_blocks=cfg.num_layers, B=B, T=T,
              rank=config.optim.galore.rank, remat=mc.remat, dtype=mc.dtype,
              frozen_GiB=round(nbytes(frozen) / GIB, 3), trainable_GiB=round(nbytes(trainable) / GIB, 3),
              opt_state_GiB=round(nbytes(state.opt_state) / GIB, 3),
              argument_GiB=round(arg / GIB, 3), output_GiB=round(out / GIB, 3), alias_GiB=round(alias / GIB, 3),
              temp_GiB=round(temp / GIB, 3), peak_GiB=round((arg + out - alias + temp) / GIB, 3), **extra,
              backend=jax.default_backend(), jax=jax.__version__)


def main():
  preset = SIZES[os.environ.get("SIZE", "7b")]
  for case in os.environ.get("CASES", "persist:16x512,reset:16x512,reset:4x1024").split(","):
    mode, shape = case.split(":")
    B, T = (int(v) for v in shape.split("x"))
    print(json.dumps(measure(preset, mode, B, T)), flush=True)


if __name__ == "__main__":
  main()
