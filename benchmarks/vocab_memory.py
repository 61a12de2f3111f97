"""Compiled temporary memory of a LoRA SFT and a LoRA DPO step against the vocabulary size, with the full
[B, T, V] float32 logits (`logits_chunk=0`) and with the tiled head (losses/_chunked.py, the default chunk).

    python benchmarks/vocab_memory.py              # env: SIZES=tiny,1b (default both) VOCABS=32000,128256,256000

Nothing is allocated: parameters, adapters, optimizer state and batch are abstract shapes, and the jitted
`train_lib.train_step` is lowered and compiled for this machine's backend; `temp_GiB` is the compiler's
`memory_analysis().temp_size_in_bytes` (everything the step allocates besides its arguments and outputs).
Shapes are `bench_train.py`'s: bf16 weights and activations, LoRA r16 (alpha 32) on every linear layer of the
blocks (not lm_head), AdamW, every layer rematerialised; DPO's B sequences are B/2 pairs with the adapters-off
reference forward. One JSON line per (size, mode, vocab, chunk); `--markdown FILE...` prints the table of
such lines instead.

A bf16 head is tiled by a switch over static slices (losses/_chunked.weight_tile): XLA:CPU would otherwise
convert the whole head to float32 for its dynamic slices and hoist that copy out of the tile loop.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import optax

import losses
import models
import peft
import train_lib

SHAPES = {"tiny": ("bench_tiny", 4, 512), "1b": ("llama_1b", 8, 1024)}   # preset, B, T
VOCABS = (32_000, 128_256, 256_000)
GIB = 2.0 ** 30


def step_temp_bytes(preset: str, vocab: int, B: int, T: int, mode: str, chunk: int) -> int:
  cfg = models.preset(preset, vocab_size=vocab, dtype="bfloat16", param_dtype="bfloat16", remat="full",
                      logits_chunk=chunk)
  model = models.Decoder(cfg)
  spec = {"all-linear": peft.AdapterSpec("lora", rank=16, alpha=32.0)}
  params = jax.eval_shape(lambda k: peft.apply(model.init(k), spec, k), jax.random.PRNGKey(0))
  trainable, frozen = peft.split(params)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  state = jax.eval_shape(lambda t: train_lib.TrainState(jnp.zeros((), jnp.int32), t, tx.init(t),
                                                        jax.random.PRNGKey(1)), trainable)
  dpo = mode == "lora_dpo"
  loss_cfg = ml_collections.ConfigDict(dict(beta=0.1, loss_type=("sigmoid",)) if dpo else {})
  lead = (B // 2, 2) if dpo else (B, 1)
  tok = jax.ShapeDtypeStruct(lead + (T,), jnp.int32)
  batch = {"inputs": tok, "targets": tok, "positions": tok,
           "loss_mask": jax.ShapeDtypeStruct(lead + (T,), jnp.float32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=lambda s: 1e-4,
                                   loss_entry=losses.get("dpo" if dpo else "nll"), loss_cfg=loss_cfg),
                 donate_argnums=(0,))
  return step.lower(state, frozen, None, batch).compile().memory_analysis().temp_size_in_bytes


def rows(sizes, vocabs):
  chunk = models.DecoderConfig.tiny().logits_chunk      # the default tile
  for size in sizes:
    preset, B, T = SHAPES[size]
    for mode in ("lora_sft", "lora_dpo"):
      for c in (0, chunk):
        for vocab in vocabs:
          t0 = time.perf_counter()
          temp = step_temp_bytes(preset, vocab, B, T, mode, c)
          yield dict(size=size, B=B, T=T, mode=mode, vocab=vocab, logits_chunk=c, temp_GiB=round(temp / GIB, 3),
                     compile_s=round(time.perf_counter() - t0, 1), backend=jax.default_backend(),
                     jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))


def markdown(records) -> str:
  """One row per (size, mode, chunk): temporaries at each vocabulary and the largest over the smallest."""
  vocabs = sorted({r["vocab"] for r in records})
  head = ("| shape | step | logits | " + " | ".join(f"V={v // 1000}k" for v in vocabs)
          + f" | {vocabs[-1] // 1000}k / {vocabs[0] // 1000}k |")
  lines = [head, "|" + "---|" * (len(vocabs) + 4)]
  keys = sorted({(r["size"], r["mode"], r["logits_chunk"]) for r in records},
                key=lambda k: (list(SHAPES).index(k[0]), k[1] != "lora_sft", k[2]))
  for size, mode, c in keys:
    got = {r["vocab"]: r["temp_GiB"] for r in records if (r["size"], r["mode"], r["logits_chunk"]) == (size, mode, c)}
    _, B, T = SHAPES[size]
    cells = [f"{got[v]:.3f}" if v in got else "" for v in vocabs]
    ratio = f"{got[vocabs[-1]] / got[vocabs[0]]:.2f}x" if vocabs[0] in got and vocabs[-1] in got else ""
    lines.append(f"| {size} (B={B}, T={T}) | {mode} | {'full [B,T,V]' if c == 0 else f'tiles of {c}'} | "
                 + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines)


def main():
  if "--markdown" in sys.argv:
    files = sys.argv[sys.argv.index("--markdown") + 1:]
    print(markdown([json.loads(line) for f in files for line in open(f) if line.strip()]))
    return
  sizes = os.environ.get("SIZES", "tiny,1b").split(",")
  vocabs = [int(v) for v in os.environ.get("VOCABS", ",".join(map(str, VOCABS))).split(",")]
  for r in rows(sizes, vocabs):
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
