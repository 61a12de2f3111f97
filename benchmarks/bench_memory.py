"""Optimizer-state and trainable-parameter memory of each memory-efficient method on Llama shapes.

    python benchmarks/bench_memory.py                  # env: SIZES=tiny,1b,7b (default all three)

Nothing is allocated: the parameter tree, the method's parameter transform and `tx.init` are traced with
`jax.eval_shape`, so even 7B runs on a laptop in seconds. Weights are bf16 as in `peers_torch.py` (whose full
fine-tuning keeps bf16 AdamW states), so optimizer states come out in bf16 too (GaLore's projectors included).
One JSON line per (method, size) with the peer benchmark's `mode`, `size` and `params_M`, plus
`opt_state_GiB` (persistent optimizer state) and `trainable_GiB` (the trainable parameter tree, whose
gradient the step also holds). Methods: full AdamW, GaLore rank 128 and 1024 (attention/MLP kernels
projected), Fira (rank 128), FRUGAL (density 0.25), LISA (gamma 2), OwLore (gamma 5, GaLore rank 256) and
LIFT (rank 128). LISA and `owlore` reset the blocks' state at every draw (`sampling.state=reset`): state
for gamma blocks plus the embeddings, final norm and head, for the whole run; `owlore_persist` keeps every
block's state as OwLore's torch code does (the default of `configs/owlore.py`), sized for all blocks. Step
time and peak memory are `bench_train.py`'s job (`owlore_memory.py` for OwLore's compiled step).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import models
import peft
from configs import galore as galore_config
from configs import lift as lift_config
from configs import lisa as lisa_config
from configs import owlore as owlore_config
from configs import sft as sft_config

import optim

SIZES = {"tiny": "bench_tiny", "1b": "llama_1b", "7b": "llama2_7b"}
GIB = 2.0 ** 30


def method_configs(preset: str) -> dict:
  """{mode: config} of every method, from the project's own configs."""
  out = {"full_sft": sft_config.get_config(f"model={preset}")}
  for rank in (128, 1024):
    out[f"galore_r{rank}"] = galore_config.get_config(f"model={preset},opt=galore,rank={rank}")
  out["fira"] = galore_config.get_config(f"model={preset},opt=fira,rank=128")
  out["frugal"] = galore_config.get_config(f"model={preset},opt=frugal")
  out["lisa"] = lisa_config.get_config(f"model={preset},gamma=2")
  depth = models.preset(preset).num_layers
  out["owlore"] = owlore_config.get_config(f"model={preset},gamma={min(5, depth)},rank=256")
  out["owlore"].sampling.state = "reset"
  out["owlore_persist"] = owlore_config.get_config(f"model={preset},gamma={min(5, depth)},rank=256")
  out["lift"] = lift_config.get_config(f"model={preset},rank=128")
  return out


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(config, cfg: models.DecoderConfig) -> dict:
  model = models.Decoder(cfg)
  gamma = config.sampling.gamma if config.get("sampling") else None

  def trainable():
    params = model.init(jax.random.PRNGKey(0))
    if gamma is not None:
      params = peft.sample_layers(params, np.arange(gamma))
    return peft.split(params)[0]

  abstract = jax.eval_shape(trainable)
  config.total_steps = 1000
  tx, _ = optim.from_config(config, abstract)     # with the per-block state of sampling.state=persist
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0))))
  row = dict(params_M=round(n_params / 1e6, 1), opt_state_GiB=round(nbytes(jax.eval_shape(tx.init, abstract)) / GIB, 3),
             trainable_GiB=round(nbytes(abstract) / GIB, 3))
  if gamma is not None:
    row["gamma"] = gamma
  return row


def main():
  sizes = os.environ.get("SIZES", "tiny,1b,7b").split(",")
  for size in sizes:
    cfg = models.preset(SIZES[size], dtype="bfloat16", param_dtype="bfloat16")
    for mode, config in method_configs(SIZES[size]).items():
      print(json.dumps(dict(peer="jax-project", mode=mode, size=size, **measure(config, cfg),
                            jax=jax.__version__)), flush=True)


if __name__ == "__main__":
  main()
