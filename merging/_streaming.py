"""Merging Hugging Face safetensors checkpoints tensor by tensor, without loading whole models.

    merging.merge_checkpoints("ties", "base/", ["ft1/", "ft2/"], "out/", density=0.2, weight=[1.0, 0.5])

For the per-tensor methods ("tensor" kind) peak memory is about one tensor of each input plus the float32
working copies and one output shard (`max_shard_bytes`): each tensor is read with `safe_open` (numpy;
bfloat16 through ml_dtypes, read from the raw bytes where the installed safetensors cannot), merged, kept
in the current shard, and the shard is written with `save_file` once it is full. Names and layouts are
HF's (torch [out, in]); parameter regexes match HF names (`model\\.layers\\.0\\..*`). PCB and ComPEFT
("model" kind, whole-model statistics) load every tensor of every model first (not streaming). The
output holds `model-0000k-of-0000n.safetensors` shards, `model.safetensors.index.json`, and the base's
config.json, generation_config.json and tokenizer files. Tensors absent from some model raise.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

import models
from merging._registry import MergeMethod, _is_float, get

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
           "chat_template.jinja")
def _read_tensor(file: str, name: str) -> np.ndarray:
  return models.read_tensor(file, name).copy()    # a copy: nothing keeps the file's bytes alive


class CheckpointReader:
  """name -> numpy tensor over `model.safetensors` or the shards its index lists.

  Each read opens the file, copies the one tensor out and closes it again, so no memory map of a whole
  shard stays resident in the process between tensors.
  """

  def __init__(self, path: str):
    from safetensors import safe_open   # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    index, single = os.path.join(path, _INDEX), os.path.join(path, _SINGLE)
    if os.path.exists(index):
      with open(index) as f:
        self.files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        self.files = {k: single for k in f.keys()}
    else:
      raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}")

  def names(self) -> list[str]:
    return list(self.files)

  def get(self, name: str) -> np.ndarray:
    file = self.files[name]
    try:
      with self._safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)
    except (TypeError, KeyError, ValueError, RuntimeError):
      return _read_tensor(file, name)


class ShardWriter:
  """Collects tensors and writes a shard whenever `max_shard_bytes` is reached; `close` writes the index."""

  def __init__(self, path: str, max_shard_bytes: int):
    os.makedirs(path, exist_ok=True)
    self.path, self.max_bytes = path, max_shard_bytes
    self.pending, self.pending_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

  def add(self, name: str, x: np.ndarray):
    if self.pending and self.pending_bytes + x.nbytes > self.max_bytes:
      self.flush()
    self.pending[name] = np.ascontiguousarray(x)
    self.pending_bytes += x.nbytes
    self.total += x.nbytes

  def flush(self):
    from safetensors.numpy import save_file   # pylint: disable=g-import-not-at-top
    if not self.pending:
      return
    tmp = f"shard-{len(self.files) + 1:05d}.tmp"
    save_file(self.pending, os.path.join(self.path, tmp), metadata={"format": "pt"})
    self.files.append((tmp, list(self.pending)))
    self.pending, self.pending_bytes = {}, 0

  def abort(self):
    for tmp, _ in self.files:
      if os.path.exists(os.path.join(self.path, tmp)):
        os.remove(os.path.join(self.path, tmp))

  def close(self):
    self.flush()
    n = len(self.files)
    for k, (tmp, names) in enumerate(self.files):
      file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      os.replace(os.path.join(self.path, tmp), os.path.join(self.path, file))
      self.weight_map.update({name: file for name in names})
    with open(os.path.join(self.path, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)


def merge_checkpoints(method, base_dir: Optional[str], model_dirs: Sequence[str], out_dir: str, *,
                      seed: int = 0, max_shard_bytes: int = 1 << 30, **params) -> str:
  """Merges HF safetensors checkpoints with a registered method (module docstring); returns out_dir."""
  m: MergeMethod = get(method) if isinstance(method, str) else method
  if m.kind == "lora":
    raise ValueError(f"{m.name} merges LoRA factors, not checkpoints")
  if m.base == "required" and base_dir is None:
    raise ValueError(f"{m.name} needs a base checkpoint")
  if m.tensor_params:
    raise ValueError(f"{m.name} needs per-model tensors ({m.tensor_params}); merge in memory instead")
  use_base = base_dir is not None and m.base != "unused"
  readers = [CheckpointReader(d) for d in model_dirs]
  base = CheckpointReader(base_dir) if use_base else None
  names = (base or readers[0]).names()
  for d, r in zip(model_dirs, readers):
    if set(r.names()) != set(names):
      raise ValueError(f"{d} holds other tensors than the reference: {sorted(set(r.names()) ^ set(names))[:5]}")
  writer = ShardWriter(out_dir, max_shard_bytes)
  try:
    if m.kind == "model":
      merged = m(None if base is None else {n: base.get(n) for n in names},
                 [{n: r.get(n) for n in names} for r in readers], seed=seed, stacked=None, **params)
      for n in names:
        writer.add(n, np.asarray(merged[n]))
    else:
      m.check_params(params)
      for n in names:
        b = base.get(n) if base is not None else None
        xs = [r.get(n) for r in readers]
        ref = b if b is not None else xs[0]
        if not _is_float(ref):
          out = ref
        else:
          out = np.asarray(m.tensor(b, xs, path=n, seed=seed, **params))
        del b, xs
        writer.add(n, out)
    writer.close()
  except BaseException:
    writer.abort()
    raise
  src = base_dir if base_dir is not None else model_dirs[0]
  for f in _COPIED:
    if os.path.exists(os.path.join(src, f)):
      shutil.copy(os.path.join(src, f), os.path.join(out_dir, f))
  return out_dir
