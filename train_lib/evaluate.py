"""Evaluation: held-out loss, and exact match of greedy generations checked by the task's verifier."""
from __future__ import annotations

import jax
import numpy as np

import data as data_lib
from train_lib import generation as gen_lib
from train_lib import sharding as shd

MODEL_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def to_model_batch(batch: dict) -> dict:
  """Host batch -> [B, K, T] layout (SFT batches get K = 1)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = v[:, None] if k in MODEL_KEYS and v.ndim == 2 else v
  return out


def put_batch(batch: dict, mesh) -> dict:
  return {k: jax.device_put(v, shd.batch_sharding(mesh, np.ndim(v)) if np.ndim(v) else shd.replicated(mesh))
          for k, v in batch.items()}


def heldout_loss(config, tokenizer, eval_fn, mesh) -> dict:
  ec = config.eval
  it = data_lib.get_dataset(config.data, config.get("eval_split", "test"), tokenizer=tokenizer,
                            batch_size=ec.batch_size, seq_len=int(config.seq_len), seed=config.seed)
  sums, n = {}, 0
  for i, batch in enumerate(it):
    if i >= ec.get("num_loss_batches", 4):
      break
    m = jax.device_get(eval_fn(put_batch(to_model_batch(batch), mesh)))
    # The last eval batch is filled with masked copies: weight each batch by its real examples.
    w = float(np.sum(batch["example_mask"])) if "example_mask" in batch else 1.0
    for k, v in m.items():
      if np.ndim(v) == 0:
        sums[k] = sums.get(k, 0.0) + w * float(v)
    n += w
  return {k: v / max(n, 1e-9) for k, v in sums.items()}


def exact_match(config, model, params, tokenizer) -> float:
  ec = config.eval
  examples, check = data_lib.eval_examples(config.data, config.get("eval_split", "test"), ec.num_examples)
  if not examples:
    return float("nan")
  correct = 0
  bs = ec.batch_size
  for i in range(0, len(examples), bs):
    chunk = examples[i:i + bs]
    prompts = [tokenizer.encode(p, add_bos=True) for p, _ in chunk]
    outs = gen_lib.generate(model, params, prompts, max_new_tokens=ec.max_new_tokens,
                            stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id)
    for (p, _), o in zip(chunk, outs):
      correct += bool(check(p, tokenizer.decode(o)))
  return correct / len(examples)


def evaluate(config, model, params, tokenizer, eval_fn, mesh) -> dict:
  res = {}
  if config.eval.get("num_loss_batches", 4):
    res.update(heldout_loss(config, tokenizer, eval_fn, mesh))
  if config.eval.get("num_examples", 0):
    res["exact_match"] = exact_match(config, model, params, tokenizer)
  return res
