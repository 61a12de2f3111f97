"""The tasks of main.py, by name: train, and eval / export / diagnose / sweep / merge / precompute over workdirs.

    python main.py --config=configs/eval.py --config.train_workdir=/tmp/sft --workdir=/tmp/sft_eval

`register_task(name)` adds one (a function `(config, workdir)`); `run_task(config, workdir)` runs
`config.task`.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
from typing import Callable

import jax

import data as data_lib
import models
import peft
from train_lib import build
from train_lib import diagnose as diagnose_lib
from train_lib import evaluate as eval_lib
from train_lib import export_files
from train_lib import merge as merge_lib
from train_lib import precompute as precompute_lib
from train_lib import train as train_lib

TASKS: dict[str, Callable] = {}


def register_task(name: str):
  def deco(fn):
    if name in TASKS:
      raise ValueError(f"task {name!r} registered twice")
    TASKS[name] = fn
    return fn
  return deco


def run_task(config, workdir: str):
  name = config.get("task", "train")
  if config.get("dry_run"):     # shapes, compile, memory and FLOPs only (train_lib/dry_run.py)
    from train_lib import dry_run as dry_run_lib   # pylint: disable=g-import-not-at-top
    return dry_run_lib.dry_run(config, workdir)
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; valid: {', '.join(sorted(TASKS))}")
  return TASKS[name](config, workdir)


register_task("train")(train_lib.train_and_evaluate)
register_task("diagnose")(diagnose_lib.diagnose)
register_task("merge")(merge_lib.merge)
register_task("precompute")(precompute_lib.precompute)


def _load_for_eval(config):
  """(config, model, params, tokenizer, reference) of `config.train_workdir`, or of a Hugging Face
  checkpoint `config.hf_path` (its own tokenizer; the eval options and data of `config`; no reference)."""
  if config.get("train_workdir"):
    cfg, model, params, tokenizer = build.load_trained(config.train_workdir, config.get("step") or None)
    # The reference of preference pairs and win rates: the model the run started from.
    return cfg, model, params, tokenizer, lambda: build.build_model(cfg, tokenizer)[1]
  if not config.get("hf_path"):
    raise ValueError("the eval task needs config.train_workdir (a run) or config.hf_path (an HF checkpoint)")
  cfg = configs_base()
  cfg.model.hf_path = config.hf_path
  cfg.data.tokenizer = config.hf_path
  cfg.eval.num_examples = 0
  cfg.eval.num_loss_batches = 0
  model, params = build.build_model(cfg, None)
  return cfg, model, params, data_lib.load_tokenizer(config.hf_path), None


def configs_base():
  import ml_collections   # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(hf_path="", dtype="float32", param_dtype="float32"))
  cfg.data = data_lib.default_config()
  cfg.seq_len = 2048
  cfg.loss = ml_collections.ConfigDict(dict(name="nll"))
  cfg.eval = ml_collections.ConfigDict(dict(batch_size=16, max_new_tokens=256))
  cfg.eval_split = "test"
  return cfg


@register_task("eval")
def evaluate(config, workdir: str) -> dict:
  """Exact match on the run's held-out split and the task files of `config.eval.tasks` (multiple choice,
  generation with answer extraction, perplexity, preference pairs, win rates; see train_lib/eval_tasks.py)
  of the run in `config.train_workdir` or of the HF checkpoint `config.hf_path`; writes workdir/eval.json."""
  cfg, model, params, tokenizer, reference = _load_for_eval(config)
  if config.get("eval"):
    cfg.eval.update(config.eval.to_dict())
  res = {}
  if cfg.eval.get("num_examples", 0) and config.get("train_workdir"):
    res["exact_match"] = eval_lib.exact_match(cfg, model, params, tokenizer)
  res.update(eval_lib.run_tasks(cfg, model, params, tokenizer, None, reference))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(res, f, indent=2)
  print(json.dumps(res), flush=True)
  return res


@register_task("export")
def export(config, workdir: str) -> str:
  """Writes the run in `config.train_workdir` as a Hugging Face checkpoint (adapters merged) to
  workdir/hf with its tokenizer files, chat template and generation_config.json (train_lib/export_files.py),
  and, for adapter runs, the HF PEFT adapter to workdir/adapter."""
  cfg, model, params, tokenizer = build.load_trained(config.train_workdir, config.get("step") or None)
  dtype = config.get("dtype") or None
  out = os.path.join(workdir, "hf")
  extra = {}
  for name in ("bos", "eos", "pad"):
    tid = getattr(tokenizer, f"{name}_id", None)
    if tid is not None:
      extra[f"{name}_token_id"] = int(tid)
  models.save_hf(out, model.config, params, model_type=config.get("model_type", "llama"), dtype=dtype,
                 generation_config=export_files.generation_config(tokenizer), **extra)
  export_files.write_tokenizer(cfg.data, tokenizer, out)
  if peft.has_adapters(params) and hasattr(peft, "export_adapter"):
    initial = None
    if peft.needs_initial(cfg.peft):
      # A residual-base init: its step-0 params, rebuilt as the run built them (same seed, base and
      # calibration batches), turn the adapter into a plain LoRA for the original base.
      start_model, start = build.build_model(cfg, tokenizer)
      initial = jax.device_get(build.transform_params(cfg, start_model, start)[0])
    peft.export_adapter(os.path.join(workdir, "adapter"), params, cfg.peft,
                        model_type=config.get("model_type", "llama"), initial=initial)
  print(f"exported to {workdir}", flush=True)
  return out


@register_task("sweep")
def sweep(config, workdir: str):
  """A short training run per point of `config.sweep.grid` (((dotted config key, values), ...)), all from
  the same start, each scored by `config.sweep.metric` of its held-out evaluation. Prints and writes the
  table (`config.sweep.output_file`), best first; returns (rows, best) with rows (value, ..., score).

      python main.py --config=configs/dpo_kernels.py:select --config.model.init_workdir=/tmp/sft --workdir=/tmp/sel
  """
  sw = config.sweep
  keys = [k for k, _ in sw.grid]
  rows = []
  for values in itertools.product(*[tuple(v) for _, v in sw.grid]):
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.task = "train"
      for key, value in zip(keys, values):
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
          node = node[p]
        node[leaf] = value
      cfg.total_steps = sw.steps
      cfg.eval_before = False
      cfg.checkpoint_every_steps = sw.steps
    summary = train_lib.train_and_evaluate(cfg, os.path.join(workdir, "_".join(str(v) for v in values)))
    rows.append((*values, float(summary["after"][sw.metric])))
  higher = sw.get("higher_is_better", True)
  rows.sort(key=lambda r: -r[-1] if higher else r[-1])
  names = [k.split(".")[-1] for k in keys] + [sw.metric]
  widths = [max(len(n), *(len(str(r[i])) for r in rows)) for i, n in enumerate(names[:-1])]
  lines = [" ".join(f"{n:<{w}}" for n, w in zip(names, widths)) + f" {sw.metric:>10}"]
  lines += [" ".join(f"{str(v):<{w}}" for v, w in zip(r[:-1], widths)) + f" {r[-1]:>10.4f}" for r in rows]
  text = "\n".join(lines)
  print(text, flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, sw.get("output_file", "sweep.md")), "w") as f:
    f.write(f"metric: {sw.metric} after {sw.steps} steps; best: {rows[0][:-1]}\n\n{text}\n")
  return rows, rows[0][:-1]
