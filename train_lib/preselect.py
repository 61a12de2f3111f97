"""The `preselect` task: a loss's own choice of its settings, from the data and the model before training.

    python main.py --config=configs/dpo_kernels.py:select_by=metrics --config.model.init_workdir=/tmp/sft \
        --workdir=/tmp/presel

One forward pass of the starting model (`config.model`: init_workdir, hf_path or the preset) over
`config.selection.num_batches` training batches gives the outputs the loss's registered statistics need
(`losses.get_selection(config.loss.name)`); the statistics, the table and the chosen settings are written
to workdir/`config.selection.output_file`.{json,md}. Nothing is trained.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

import data as data_lib
import losses
from train_lib import build
from train_lib import evaluate as eval_lib
from train_lib.tasks import register_task


def pooled_outputs(config, model, params, tokenizer, needs, num_batches: int, split: str = "train") -> dict:
  """{key: [n, K, ...] host array} of `model_outputs` over the first `num_batches` batches of `split`."""
  fwd = jax.jit(lambda p, b: losses.model_outputs(model, p, b, needs))
  ds = data_lib.get_dataset(config.data, split, tokenizer=tokenizer, batch_size=config.batch_size,
                            seq_len=int(config.seq_len), seed=config.seed)
  chunks = []
  for i, batch in enumerate(ds):
    if i >= num_batches:
      break
    out = jax.device_get(fwd(params, eval_lib.to_model_batch(batch)))
    chunks.append(out)
  if not chunks:
    raise ValueError(f"the {split!r} split gave no batch")
  return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]}


@register_task("preselect")
def preselect(config, workdir: str) -> dict:
  """Writes the loss's pre-training selection statistics and its chosen settings; returns the stats dict."""
  config = build.with_defaults(config)
  entry = losses.get_selection(config.loss.name)
  sc = config.get("selection") or {}
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build.build_model(config, tokenizer)
  outputs = pooled_outputs(config, model, params, tokenizer, entry.needs, int(sc.get("num_batches", 8)),
                           sc.get("split", "train"))
  stats = entry.fn(outputs, config.loss)
  text = entry.format(stats)
  best = " ".join(f"--config.loss.{k}={v}" for k, v in stats["best"].items())
  text += f"\nTrain with: {best}\n"
  print(text, flush=True)
  os.makedirs(workdir, exist_ok=True)
  name = sc.get("output_file", "preselect")
  with open(os.path.join(workdir, name + ".json"), "w") as f:
    json.dump(stats, f, indent=2)
  with open(os.path.join(workdir, name + ".md"), "w") as f:
    f.write(text)
  return stats
