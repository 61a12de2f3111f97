"""Peak resident memory of a streaming TIES merge of two 7B-shaped bf16 checkpoints.

    python benchmarks/bench_merge_memory.py                       # LLaMA-2-7B shapes, 32 layers
    python benchmarks/bench_merge_memory.py --layers=8 --dir=DIR  # fewer layers (disk), scratch dir

Writes a random base and one random fine-tune (bf16, LLaMA-2-7B shapes: hidden 4096, intermediate 11008,
vocab 32000; about 12.6 GiB each at 32 layers) as HF safetensors directories, then runs
`merging.merge_checkpoints("ties", base, [ft], out, density=0.2)` in a fresh process and reports that
process's peak RSS (`resource.getrusage(...).ru_maxrss` and VmHWM from /proc/self/status), its wall time,
and the sizes involved as one JSON line; `--keep` keeps the files, otherwise they are deleted.
Loading the three models whole would need about 3 x 12.6 GiB in bf16 (and twice that in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
  s = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
  for i in range(layers):
    p = f"model.layers.{i}."
    for n in ("q", "k", "v", "o"):
      s[p + f"self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
    s[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
    s[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
    s[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    s[p + "input_layernorm.weight"] = (HIDDEN,)
    s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
  s["model.norm.weight"] = (HIDDEN,)
  s["lm_head.weight"] = (VOCAB, HIDDEN)
  return s


def write_checkpoint(path: str, shapes, seed: int, base_seed=None, shard_bytes: int = 2 << 30):
  """Random bf16 weights (N(0, 0.02)); with base_seed, the base's weights plus N(0, 0.002) noise."""
  import ml_dtypes
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  names = list(shapes)
  shards, cur, size = [], {}, 0
  for name in names:
    nbytes = int(np.prod(shapes[name])) * 2
    if cur and size + nbytes > shard_bytes:
      shards.append(cur); cur, size = {}, 0
    cur[name] = shapes[name]; size += nbytes
  shards.append(cur)
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    tensors = {}
    for name, shape in shard.items():
      idx = names.index(name)
      rng = np.random.default_rng([base_seed if base_seed is not None else seed, idx])
      x = rng.standard_normal(shape, dtype=np.float32) * 0.02
      if base_seed is not None:
        x += np.random.default_rng([seed, idx]).standard_normal(shape, dtype=np.float32) * 0.002
      tensors[name] = x.astype(bf16)
      del x
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in tensors})
    total += sum(t.nbytes for t in tensors.values())
    del tensors
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
               "num_hidden_layers": len([n for n in shapes if n.endswith("input_layernorm.weight")]),
               "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
               "torch_dtype": "bfloat16"}, f)
  return total


_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import merging
t = time.time()
merging.merge_checkpoints("ties", {base!r}, [{ft!r}], {out!r}, density=0.2)
wall = time.time() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"ru_maxrss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "VmHWM_GiB": int(hwm) / 2**20, "merge_wall_s": wall}}))
"""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=32)
  ap.add_argument("--dir", default=None, help="scratch directory (default: a new temporary one)")
  ap.add_argument("--keep", action="store_true")
  args = ap.parse_args()
  work = args.dir or tempfile.mkdtemp(prefix="merge_bench_")
  base, ft, out = (os.path.join(work, n) for n in ("base", "ft", "out"))
  shapes = tensor_shapes(args.layers)
  try:
    t = time.time()
    size = write_checkpoint(base, shapes, seed=0)
    write_checkpoint(ft, shapes, seed=1, base_seed=0)
    write_s = time.time() - t
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT, base=base, ft=ft, out=out)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode:
      raise SystemExit(r.stderr[-4000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    largest = max(int(np.prod(s)) for s in shapes.values())
    res.update(method="ties", density=0.2, layers=args.layers, checkpoint_GiB=size / 2**30,
               largest_tensor_M=largest / 1e6, write_s=write_s, max_shard_GiB=1.0)
    print(json.dumps(res))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
