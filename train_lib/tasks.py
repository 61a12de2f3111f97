"""The non-training tasks of main.py: eval and export of a trained workdir."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp

import models
import peft
from train_lib import evaluate as eval_lib
from train_lib import restore
from train_lib import sharding as shd


def evaluate(config, workdir: str) -> dict:
  """Held-out loss and exact match of the run in `config.train_workdir`; writes workdir/eval.json."""
  cfg, model, params, tokenizer = restore.load_trained(config.train_workdir, config.get("step") or None)
  if config.get("eval"):
    cfg.eval.update(config.eval.to_dict())
  res = {}
  if cfg.eval.get("num_examples", 0):
    res["exact_match"] = eval_lib.exact_match(cfg, model, params, tokenizer)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(res, f, indent=2)
  print(json.dumps(res), flush=True)
  return res


def export(config, workdir: str) -> str:
  """Writes the run in `config.train_workdir` as a Hugging Face checkpoint (adapters merged) to
  workdir/hf, and, for adapter runs, the HF PEFT adapter to workdir/adapter."""
  cfg, model, params, tokenizer = restore.load_trained(config.train_workdir, config.get("step") or None)
  dtype = config.get("dtype") or None
  out = os.path.join(workdir, "hf")
  extra = {}
  for name in ("bos", "eos", "pad"):
    tid = getattr(tokenizer, f"{name}_id", None)
    if tid is not None:
      extra[f"{name}_token_id"] = int(tid)
  models.save_hf(out, model.config, params, model_type=config.get("model_type", "llama"), dtype=dtype, **extra)
  tok_dir = cfg.data.get("tokenizer")
  if tok_dir and os.path.isdir(tok_dir):
    for name in os.listdir(tok_dir):
      if name.startswith(("tokenizer", "special_tokens", "chat_template")) or name.endswith(".model"):
        shutil.copy(os.path.join(tok_dir, name), out)
  if peft.has_adapters(params) and hasattr(peft, "export_adapter"):
    peft.export_adapter(os.path.join(workdir, "adapter"), params, cfg.peft,
                        model_type=config.get("model_type", "llama"))
  print(f"exported to {workdir}", flush=True)
  return out
