"""Speed and memory of one training step on Llama shapes, printed with the PyTorch peer's JSON fields.

    python benchmarks/bench_train.py full_sft|lora_sft|lora_dpo|galore_sft   # env: SIZE=tiny|1b|7b B=8 T=1024
                                                                              #      STEPS=10 REMAT=none RANK=

Same shapes, fields and FLOP count as `peers_torch.py` (random bf16 weights, bf16 AdamW states, T=1024), so
the two JSON lines stand side by side as ratios (`benchmarks/compare.py` runs both and prints the ratios).
"""
from __future__ import annotations

import functools
import json
import os
import resource
import statistics
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

SIZES = {"tiny": "bench_tiny", "1b": "llama_1b", "7b": "llama2_7b"}


def peak_mem_gib() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # CPU: process peak RSS


def build(mode: str, size: str, remat: str):
  cfg = models.preset(SIZES[size], dtype="bfloat16", param_dtype="bfloat16", remat=remat,
                      attention_impl="cudnn" if jax.default_backend() == "gpu" else None)
  model = models.Decoder(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  n_base = peft.count(params)   # the model's own parameters, as the peer counts them (before any adapter)
  if mode == "full_sft":
    tx = optax.adamw(1e-5, weight_decay=0.0)
    trainable_weights = True
  elif mode == "lora_sft":   # PEFT LoraConfig(r=RANK, lora_alpha=2*RANK, target_modules="all-linear"), fp32 adapters
    rank = int(os.environ.get("RANK", "16"))
    params = peft.apply(params, {"all-linear": peft.AdapterSpec("lora", rank=rank, alpha=2.0 * rank)},
                        jax.random.PRNGKey(1))
    tx = optax.adamw(1e-4, weight_decay=0.0)
    trainable_weights = False   # no weight gradients for the frozen base (the FLOP count's 4 instead of 6)
  elif mode == "lora_dpo":   # as lora_sft; B sequences = B/2 pairs, reference = the base without adapters
    rank = int(os.environ.get("RANK", "16"))
    params = peft.apply(params, {"all-linear": peft.AdapterSpec("lora", rank=rank, alpha=2.0 * rank)},
                        jax.random.PRNGKey(1))
    tx = optax.adamw(1e-4, weight_decay=0.0)
    trainable_weights = False
  elif mode == "galore_sft":   # galore-torch's peer: attn/mlp kernels projected, rank RANK, gap 200, scale 0.25
    import optim
    tx = optim.get_optimizer("galore")(1e-4, rank=int(os.environ.get("RANK", "128")), update_proj_gap=200,
                                       scale=0.25, weight_decay=0.0)
    trainable_weights = True
  elif mode == "owlore_sft":   # OwLore's footprint: GAMMA sampled blocks trained with GaLore (RANK), rest frozen
    import numpy as np
    import optim
    params = peft.sample_layers(params, np.arange(int(os.environ.get("GAMMA", "5"))))
    cfg = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-4, warmup_steps=0, schedule="constant", grad_clip_norm=0.0,
        rules=((r"layers/.*/slots", "galore"), (".*", "adamw")),
        galore=dict(projected=r"layers/(attn|mlp)/.*_proj/kernel/slots", rank=int(os.environ.get("RANK", "256")),
                    update_proj_gap=100, scale=1.0, proj_type="std", eps=1e-6, weight_decay=0.0)))
    tx, _ = optim.make(cfg, peft.split(params)[0], 100)
    trainable_weights = True
  else:
    raise SystemExit(f"unknown mode {mode}")
  return model, params, tx, trainable_weights, n_base


def main():
  mode = sys.argv[1] if len(sys.argv) > 1 else "full_sft"
  size = os.environ.get("SIZE", "tiny")
  B, T = int(os.environ.get("B", "8")), int(os.environ.get("T", "1024"))
  steps = int(os.environ.get("STEPS", "10"))
  model, params, tx, trainable_weights, n_params = build(mode, size, os.environ.get("REMAT", "none"))
  trainable, frozen = peft.split(params)
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(1))
  dpo = mode == "lora_dpo"
  loss_cfg = ml_collections.ConfigDict(dict(beta=0.1, loss_type=("sigmoid",)) if dpo else {})
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=lambda s: 1e-5,
                                   loss_entry=losses.get("dpo" if dpo else "nll"), loss_cfg=loss_cfg),
                 donate_argnums=(0,))
  key = jax.random.PRNGKey(2)
  lead = (B // 2, 2) if dpo else (B, 1)     # DPO: chosen and rejected of a pair in one batch
  tokens = jax.random.randint(key, lead + (T + 1,), 0, model.config.vocab_size)
  batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
           "loss_mask": jnp.ones(lead + (T,), jnp.float32),
           "positions": jnp.broadcast_to(jnp.arange(T), lead + (T,))}
  times = []
  for i in range(steps + 3):
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, None, batch)
    jax.block_until_ready(metrics["loss"])
    if i >= 3:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  extra = 1.5 if dpo else 1.0   # DPO adds a no-grad reference forward (2N of 4N), as the peer counts it
  flops = model.flops_per_token(T, trainable_weights) * extra * B * T / med
  print(json.dumps(dict(
      peer="jax-project", mode=mode, size=size, params_M=round(n_params / 1e6, 1), B=B, T=T,
      step_ms=round(med * 1e3, 1), tokens_per_s=round(B * T / med), model_tflops=round(flops / 1e12, 1),
      peak_mem_GiB=round(peak_mem_gib(), 2), jax=jax.__version__, backend=jax.default_backend())), flush=True)


if __name__ == "__main__":
  main()
