"""What the paper recipes repeat: the recipe card (paper, table, number, data), file data, the model shapes
of the papers, the mesh of the target hardware, and the reduction the CPU dry-run test uses.

Every recipe sets `config.recipe` (a card the dry run and `python main.py --list` print) and leaves the data
path a relative placeholder (`data/paper/...`, written by `python -m data.prepare`); a run overrides it with
`--config.data.path=...`. A number is "(unverified)" where we could not read it in the paper or its code.
"""
from __future__ import annotations

import ml_collections

from configs.common import base_config

# GaLore's LLaMA shapes (`jiaweizzhao/GaLore: configs/llama_<size>.json`: vocabulary 32_000 of the T5
# tokenizer, rms_norm_eps 1e-6, untied head, max_sequence_length 1024; 7b: LLaMA-7B's shape, 2048).
LLAMA_C4 = {
    "60m": dict(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_heads=16, num_layers=24),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32),
}
# The nominal sizes the papers name the shapes by, and the counts those shapes have (tested).
NOMINAL_PARAMS = {"60m": 60e6, "130m": 130e6, "350m": 350e6, "1b": 1.0e9, "7b": 6.74e9}

# Records in the public releases (what `python -m data.prepare` checks; the source of each in data/prepare.py).
RECORDS = {
    "ultrafeedback_binarized/train_prefs": 61_135,
    "ultrafeedback_binarized/test_prefs": 2_000,
    "commonsense_170k": 170_420,
    "gsm8k/train": 7_473,
    "gsm8k/test": 1_319,
    "mmlu/test": 14_042,
    "alpaca_gpt4": 52_002,
}


def card(c, *, name, paper, table, row, metric, number, data_file, record_format, command, follows="",
         train_records=0, evaluation=""):
  """The recipe card, `config.recipe`: what the dry run and `main.py --list` print, and what a reader checks
  a finished run against. `number`: the paper's value for the cell, "(unverified)" appended where it is."""
  c.recipe = ml_collections.ConfigDict(dict(
      name=name, paper=paper, table=table, row=row, metric=metric, number=number, data_file=data_file,
      record_format=record_format, train_records=int(train_records), evaluation=evaluation, command=command,
      follows=follows))
  return c


def base(preset: str, **overrides) -> ml_collections.ConfigDict:
  """base_config() with a model preset (its own vocabulary) and shape overrides, bf16 compute."""
  c = base_config()
  c.model.name = preset
  for k, v in overrides.items():
    c.model.overrides[k] = v
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.eval_before = False
  c.eval.num_examples = 0                 # no exact-match generations: the recipes name their own evaluation
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  return c


def file_data(c, path: str, *, fmt: str = "auto", source: str = "jsonl", pref_kind=None, tokenizer=None,
              completion_only: bool = True, packing: str = "first_fit"):
  """Data from a prepared file (`{split}` in `path` -> train / test)."""
  d = c.data
  d.source = source
  d.path = path
  d.format = fmt
  d.pref_kind = pref_kind
  d.completion_only_loss = completion_only
  d.packing = packing
  if tokenizer is not None:
    d.tokenizer = tokenizer
  return c


def gpu_mesh(c, *, fsdp: int = 1, tensor: int = 1):
  """The mesh the recipe compiles for: data parallel over the rest (-1), `fsdp` x `tensor` model sharding."""
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp, tensor=tensor))
  return c


# =====================================================================================================
# The reduction of the CPU dry-run test (README "Paper recipes")
# =====================================================================================================
REDUCED_MODEL = dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256,
                     vocab_size=512)
REDUCED = dict(batch_size=16, seq_len=64)


def reduced(config) -> ml_collections.ConfigDict:
  """The recipe with a 2-block, 128-wide model (vocabulary 512), 16 rows of 64 tokens, and every rank,
  gamma and list bounded by that: the same code path (optimizer, sampling, loss, mesh rules), compiled in
  seconds on CPU."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.hf_path = ""
  for k, v in REDUCED_MODEL.items():
    c.model.overrides[k] = v
  c.model.overrides.head_dim = None
  c.batch_size = REDUCED["batch_size"]
  c.seq_len = REDUCED["seq_len"]
  c.optim.grad_accum_steps = 1
  for opt in ("galore", "fira"):
    c.optim[opt].rank = min(int(c.optim[opt].rank), 16)
  if c.get("sampling") is not None and c.sampling.get("gamma"):
    c.sampling.gamma = 1
  if c.peft.get("rank"):
    c.peft.rank = min(int(c.peft.rank), 8)
  return c


# The commonsense suites of LLM-Adapters (`AGI-Edgerunners/LLM-Adapters: dataset/<name>/test.json`), and
# the size of each test set, as `python -m data.prepare commonsense` writes them (mc records).
COMMONSENSE = {"boolq": 3_270, "piqa": 1_838, "social_i_qa": 1_954, "hellaswag": 10_042, "winogrande": 1_267,
               "ARC-Easy": 2_376, "ARC-Challenge": 1_172, "openbookqa": 500}


def commonsense_eval(c, root: str = "data/paper/commonsense"):
  """The eight suites as multiple-choice task files (accuracy per suite; the papers report their mean)."""
  c.eval.tasks = ",".join(f"mc:{root}/{name}.jsonl" for name in COMMONSENSE)
  c.eval.num_task_examples = 0
  return c


# Every recipe of configs/paper/, as `file:arg` (what the dry-run test and benchmark run, `main.py --list`).
RECIPES = (
    "galore_c4:size=60m", "galore_c4:size=130m", "galore_c4:size=350m", "galore_c4:size=1b",
    "galore_c4:size=7b", "fira_c4:size=60m", "fira_c4:size=1b", "frugal_c4:size=60m", "frugal_c4:size=1b",
    "owlore:setting=commonsense", "owlore:setting=mmlu", "owlore:setting=gsm8k", "lisa", "tempbalance",
    "dpo_ultrafeedback", "dpo_kernels", "lipo", "ties_merge",
)


def load(spec: str):
  """The config of `file:arg` (a RECIPES entry)."""
  import importlib   # pylint: disable=g-import-not-at-top
  name, _, arg = spec.partition(":")
  return importlib.import_module(f"configs.paper.{name}").get_config(arg or None)
