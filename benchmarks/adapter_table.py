"""Every registered adapter (and the LoRA optimizers LoRA+ / LoRA-FA) against LoRA and full fine-tuning on the
sort -> reverse transfer task of `lora_vs_full.py`: one base trained on `sort`, each run fine-tunes it on
`reverse` for the same steps. Writes a markdown table of held-out exact match before/after, trainable
parameters, optimizer-state bytes, step time and the train step's memory as XLA's buffer assignment counts it.

    python benchmarks/adapter_table.py --workdir=WORKDIR --out=benchmarks/results/adapters.md

Optimizer-state bytes: the bytes of every array in the train state's `opt_state` tree. Step time: the
compiled train step (the trainer's `train_step`, donated state) called on one real batch, median of
`TIME_STEPS` (20) calls after two warm-up calls (no data loading or logging). Memory: `memory_analysis()` of
that compiled step, argument + output + temp bytes (aliased donated buffers counted on both sides: an upper
bound of the step's live memory on this backend).
"""
from __future__ import annotations

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import data as data_lib
import losses
import optim
import peft
import train_lib
from benchmarks._common import get_config, train_base, transfer_args
from train_lib import build
from train_lib import evaluate as eval_lib

# (title, configs/lora.py argument, learning rate, overrides of the config (dotted path -> value), lr source)
RUNS = (
    ("full fine-tuning", "adapter=none", 1e-3, {}, "lora_vs_full"),
    ("LoRA r16", "adapter=lora", 3e-3, {}, "lora_vs_full"),
    ("rsLoRA r16 (s = alpha/sqrt r)", "adapter=lora", 3e-3, {"peft.use_rslora": True}, "as LoRA"),
    ("DoRA r16", "adapter=dora", 3e-3, {}, "as LoRA"),
    ("LoRA+ r16 (ratio 16)", "adapter=lora", 3e-3, {"optim.name": "loraplus"}, "A at LoRA's lr, B x16 (paper)"),
    ("LoRA-FA r16 (A frozen)", "adapter=lora", 3e-3, {"optim.name": "lorafa"}, "as LoRA"),
    ("IA3 (k, v, down)", "adapter=ia3", 1e-2, {"peft.targets": "k_proj,v_proj,down_proj"}, "our choice"),
    ("VeRA r256", "adapter=vera,rank=256", 2e-2, {}, "our choice (VeRA's larger-lr regime)"),
    ("NOLA r16 (k = l = 64)", "adapter=nola", 1e-2, {}, "our choice"),
    ("HRA r8", "adapter=hra,rank=8", 3e-3, {}, "as LoRA"),
    ("MiSS r16 (default)", "adapter=miss", 3e-3, {}, "as LoRA"),
    ("MiSS r16 (bat)", "adapter=miss", 3e-3, {"peft.options.mode": "bat"}, "as LoRA"),
    ("MiSS r16 (mini, mini_r 1)", "adapter=miss", 3e-3, {"peft.options.mode": "mini"}, "as LoRA"),
    ("FLoRA r16 (scale 4)", "adapter=flora", 3e-3, {}, "as LoRA"),
    ("Compacter (o, down; n 4)", "adapter=compacter", 3e-3, {"peft.targets": "o_proj,down_proj"}, "Compacter's 3e-3"),
    ("MoS r16", "adapter=mos", 3e-3, {}, "as LoRA"),
    ("LoRAMoE (8 experts r4, FFN)", "adapter=loramoe,rank=4,alpha=32", 3e-3,
     {"peft.targets": "gate_proj,up_proj,down_proj"}, "as LoRA"),
    ("AdaLoRA (init_r 12 -> target_r 8)", "adapter=adalora", 3e-3, {}, "as LoRA"),
    ("DyLoRA r16 (rank drawn per step)", "adapter=dylora", 3e-3, {}, "as LoRA"),
    ("SoRA r16 (gated)", "adapter=sora", 3e-3, {}, "as LoRA"),
    ("IncreLoRA (grows to target_r 8)", "adapter=increlora", 3e-3, {}, "as LoRA"),
    ("RandLoRA r16", "adapter=randlora", 3e-3, {}, "as LoRA"),
    ("LoRA-SB r16 (R only; init from the first update)", "adapter=lorasb,init=lorasb", 3e-3,
     {"peft.data_init.lorasb_lr": 3e-3}, "as LoRA"),
    ("KaSA r16 (base truncated by r)", "adapter=kasa", 3e-3, {}, "as LoRA"),
    ("SpIEL-AG (density 0.05, no rate decay)", "adapter=none", 1e-2,
     {"optim.rules": ((r"layers/(attn|mlp)/.*_proj/kernel", "spiel"), (".*", None)), "optim.spiel.density": 0.05},
     "our choice: an entry moves at most lr per Adam step"),
)
TIME_STEPS = 20
SKIPPED = (("bone", "MiSS default mode under Bone's former name: the MiSS (default) row"),)


def nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def set_path(cfg, dotted: str, value):
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value


def step_cost(cfg, state, frozen, n_steps: int) -> tuple[float, dict]:
  """Median seconds of the compiled train step on one real batch, and its XLA memory analysis (bytes)."""
  cfg = build.with_defaults(cfg)
  tokenizer = data_lib.get_tokenizer(cfg.data)
  model, _ = build.build_model(cfg, tokenizer)
  tx, schedule = optim.from_config(cfg, state.params)
  ds = data_lib.get_dataset(cfg.data, "train", tokenizer=tokenizer, batch_size=cfg.batch_size,
                            seq_len=int(cfg.seq_len), seed=cfg.seed)
  batch = jax.device_put(eval_lib.to_model_batch(next(iter(ds))))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=losses.get(cfg.loss.name), loss_cfg=cfg.loss), donate_argnums=(0,))
  compiled = step.lower(state, frozen, None, batch).compile()
  ma = compiled.memory_analysis()
  mem = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes, temp=ma.temp_size_in_bytes,
             alias=ma.alias_size_in_bytes)
  state = jax.tree.map(lambda x: x.copy(), state)      # the run's state stays intact; this copy is donated
  times = []
  for i in range(n_steps + 2):
    t = time.perf_counter()
    state, metrics = compiled(state, frozen, None, batch)
    jax.block_until_ready((state, metrics))
    if i >= 2:
      times.append(time.perf_counter() - t)
  return statistics.median(times), mem


def main():
  a = transfer_args("adapters.md", base_steps=400, steps=200)
  t0 = time.time()
  reused = os.path.exists(os.path.join(a.workdir, "base", "summary.json"))
  base = train_base(a.workdir, a.model, a.base_steps)
  only = set(filter(None, os.environ.get("ONLY", "").split(",")))
  rows = []
  for title, arg, lr, overrides, lr_src in RUNS:
    if only and title.split(" ")[0] not in only:
      continue
    t_run = time.time()
    cfg = get_config("lora.py", f"model={a.model},steps={a.steps},{arg}")
    cfg.model.init_workdir = base
    cfg.optim.learning_rate = lr
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, a.steps // 10)
    for k, v in overrides.items():
      set_path(cfg, k, v)
    wd = os.path.join(a.workdir, "".join(c if c.isalnum() else "_" for c in title))
    try:
      s = train_lib.train_and_evaluate(cfg, wd)
      sec, mem = step_cost(cfg, s["state"], s["frozen"], TIME_STEPS)
    except Exception as e:     # an adapter that cannot train here: its row says why
      rows.append((title, lr, lr_src, None, f"{type(e).__name__}: {e}".replace("|", "/")[:160]))
      print(title, "FAILED", e, flush=True)
      continue
    rows.append((title, lr, lr_src, (s["before"]["exact_match"], s["after"]["exact_match"],
                                     peft.count(s["state"].params), nbytes(s["state"].opt_state), sec, mem), None))
    print(title, rows[-1][3], f"{time.time() - t_run:.0f} s", flush=True)

  lines = ["# Every adapter vs LoRA and full fine-tuning on the built-in transfer task", "",
           f"A `{a.model}` model ({models_desc(a.model)}) trained on `sort` ({a.base_steps} steps) is fine-tuned "
           f"on `reverse` for {a.steps} steps (batch 64, sequence 32, AdamW, cosine schedule) by each adapter on "
           "all linear layers unless the row names its targets; rank 16 and alpha 32 unless the row says "
           "otherwise; every other option at the method's default (README: \"Random-basis and structured "
           "adapters\", \"Structured and mixture adapters\"). Exact match: 200 held-out `reverse` prompts, greedy; "
           "\"before\" is the base with the adapter at its initialisation.", "",
           "Optimizer state: bytes of every array in the train state's optimizer-state tree (float32). "
           f"Step: the compiled train step on one real batch, median of {TIME_STEPS} calls after two warm-up "
           f"calls, on the CPU ({os.cpu_count()} cores, shared with other jobs: compare rows, not absolute times). "
           "XLA memory: `compiled.memory_analysis()` of that train step, argument + output + temp bytes (the "
           "donated state counted as argument and as output: an upper bound; the frozen base is an argument).", "",
           "| run | lr (source) | exact match before | after | trainable params | optimizer state | step | "
           "XLA memory (arg + out + temp) |", "|---|---|---|---|---|---|---|---|"]
  for title, lr, lr_src, r, err in rows:
    if r is None:
      lines.append(f"| {title} | {lr:g} ({lr_src}) | skipped: {err} | | | | | |")
      continue
    b, f, n, ob, sec, mem = r
    total = mem["argument"] + mem["output"] + mem["temp"]
    lines.append(f"| {title} | {lr:g} ({lr_src}) | {b:.3f} | {f:.3f} | {n:,} | {ob / 2**10:,.1f} KiB | "
                 f"{sec * 1e3:.1f} ms | {total / 2**20:.2f} MiB ({mem['argument'] / 2**20:.2f} + "
                 f"{mem['output'] / 2**20:.2f} + {mem['temp'] / 2**20:.2f}) |")
  for name, why in SKIPPED:
    lines.append(f"| {name} | | not run: {why} | | | | | |")
  lines += ["", f"Command: `python benchmarks/adapter_table.py --workdir=WORKDIR --model={a.model} "
            f"--base_steps={a.base_steps} --steps={a.steps}` "
            f"({jax.default_backend()}, jax {jax.__version__}, {time.time() - t0:.0f} s in all"
            + ("; the base was reused from an earlier run in WORKDIR/base and is not counted" if reused else "")
            + ").", "",
            "One seed and one learning rate per method, not tuned for this task: a low \"after\" at this short "
            "budget says the method learns the task more slowly at that rate, not that it cannot learn it."]
  if not only:
    with open(a.out, "w") as f:
      f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def models_desc(name: str) -> str:
  import models
  c = models.preset(name)
  return f"hidden {c.hidden_size}, {c.num_layers} layers, FFN {c.intermediate_size}"


if __name__ == "__main__":
  main()
