"""The data config and what it resolves to: `default_config`, `resolve`, `get_tokenizer`, `make_source`.

Shared by the SFT (`data._dataset`) and preference (`data._preference`) entry points, so neither imports
the other's private names. A wrong key in the config fails at once with the valid keys listed.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from data import _formats
from data import _packing
from data import _sft
from data import _sources
import synthetic
from data import _turns

SOURCES = ("builtin", "jsonl", "parquet", "tfds", "array_record", "hf")
PREF_KINDS = synthetic.KINDS
BUILTIN_TRAIN_SIZE = 50_000
BUILTIN_EVAL_SIZE = 1_000


_ph = ml_collections.config_dict.placeholder  # a None default that flags can still override


def default_config() -> ml_collections.ConfigDict:
  """Every data option, with its default; `config.data` of an experiment is a copy with overrides."""
  c = ml_collections.ConfigDict()
  c.source = "builtin"       # one of SOURCES
  # Built-in synthetic tasks (the `synthetic` package).
  c.task = "sort"            # sort | reverse | add
  c.min_digits = _ph(int)  # digits per number; None: the task's default (sort/reverse 3-6, add 1-4)
  c.max_digits = _ph(int)
  c.eval_fraction = 0.1      # share of all problems that belong to the held-out split
  # How much data.
  c.train_size = _ph(int)  # training records (problems); builtin: None = 50_000; files: None = all
  c.eval_size = _ph(int)  # records of other splits; builtin: None = 1_000; files: None = all
  c.data_seed = 0            # which problems / which subset; the order is `seed` of get_dataset
  # Where the records are.
  c.path = _ph(str)  # jsonl | parquet | array_record file or glob ("data/{split}-*.jsonl"); "{split}" ->
                     # the split name; with source=hf: local data files for the builder `name` ("json")
  c.name = _ph(str)  # tfds builder ("synthetic_tasks/sort") or HF dataset name / path
  c.data_dir = _ph(str)  # tfds / HF data_dir
  c.hf_config = _ph(str)  # HF dataset configuration name
  # Record format (`data._formats`, one example each in data/FORMATS.md): auto (detected from the first
  # record's fields, and printed) | fields (the *_field options below) | trl | messages | alpaca |
  # sharegpt | hh_rlhf | ultrafeedback_binarized | ultrafeedback.
  c.format = "auto"
  # Which tokens of an SFT example carry the loss (TRL's options, `data._turns`).
  c.completion_only_loss = True  # the completion (a chat's last assistant turn) only; False: every token
  c.assistant_only_loss = False  # chat records: every assistant turn, its end-of-turn included
  # Record fields (format "fields").
  c.prompt_field = "prompt"
  c.response_field = "response"
  c.messages_field = _ph(str)  # e.g. "messages": chat records rendered with the chat template
  c.chat_template = _ph(str)  # jinja template; None: the tokenizer's
  c.tokenizer = _ph(str)  # tokenizer directory; "char" = CharTokenizer (the default for builtin)
  # Examples.
  c.max_prompt_len = _ph(int)  # tokens kept from the end of the prompt
  c.max_response_len = _ph(int)  # tokens kept from the start of the response
  c.truncate = True          # cut responses to fit seq_len; False: such records are invalid
  c.skip_invalid = False     # False: the first invalid record raises; True: skip and count per reason
  c.packing = "first_fit"    # first_fit | greedy | none (one example per row); True/False also work
  # Preference data (`data._preference`): [B, K, T] batches, one padded row per sequence (or pref_packing).
  c.pref_kind = _ph(str)  # None (SFT) | pairwise | unpaired | listwise
  c.chosen_field = "chosen"          # pairwise: batch index 0
  c.rejected_field = "rejected"      # pairwise: batch index 1
  c.completion_field = "completion"  # unpaired
  c.label_field = "label"            # unpaired: True / 1 = desirable
  c.responses_field = "responses"    # listwise: a list of responses
  c.scores_field = "scores"          # listwise: one number per response, higher is better, ties allowed
  c.ranks_field = "ranks"            # listwise, read when a record has no scores: 1 = best; score = 1 - rank
  c.aligned_logps_field = _ph(str)  # SFT records (PoFT): a field with the completion's log-probs under M
                                     # aligned models (a list, or one number), precomputed by
                                     # configs/precompute.py; needs packing="none" (one example per row)
  c.ref_logps_field = _ph(str)  # precomputed reference log-probs: a
                                     # field with one number per sequence, or "a,b" one field per sequence
  c.embeddings_field = _ph(str)  # pairwise: "e_x,e_c,e_r", the record fields holding precomputed prompt,
                                     # chosen and rejected embeddings (lists of D numbers; e.g. a frozen
                                     # encoder's, for DPO-Kernels' embedding_source="batch")
  c.list_size = 4                    # listwise K: shorter lists are padded (list_mask), longer are invalid
  # listwise records for a pairwise loss: None (refused) | best_worst (the top- against the bottom-scored
  # entry) | all_pairs (every pair of different scores) | adjacent (neighbours in score order). Each pair
  # is (higher score, lower score); tied pairs are left out and counted (report.dropped["tied_pair"]).
  c.list_to_pairs = _ph(str)
  c.allow_identical = False          # pairwise: keep records whose chosen == rejected (else invalid)
  c.unpaired_kl = True               # unpaired: K = 2, index 1 = the prompt with the previous example's
                                     # completion (KTO's KL estimate); False: K = 1
  c.desirable_fraction = 0.5         # builtin unpaired: share of correct completions
  # Padding-free training batches (`data._pref_packing`; evaluation stays padded): none (one padded row per
  # sequence) | packed (sequences packed into rows, gathered back per sequence by the loss) | shared_prompt
  # (also the prompt stored once per example, the completions attending to it through the mask).
  c.pref_packing = "none"
  c.pref_pack_groups = 1             # independent packing groups per batch: a multiple of grad_accum_steps,
                                     # of the processes and of the data-parallel devices
  c.pref_pack_rows = _ph(int)        # rows per group; None: the most the first epoch needs (more: next multiple)
  c.pref_pack_len = _ph(int)         # slots per packed row; None: seq_len (a shared prompt + its K completions
                                     # must fit one row)
  return c


def resolve(config) -> ml_collections.ConfigDict:
  cfg = default_config()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config or {})
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f"unknown data config keys {unknown}; valid: {', '.join(sorted(cfg))}")
  if "packing" in given:
    packing = given["packing"]
    given["packing"] = {True: "first_fit", False: "none"}.get(packing, packing)
    if given["packing"] not in _packing.MODES:
      raise ValueError(f"unknown packing {packing!r}; valid: {', '.join(_packing.MODES)}, True, False")
  for k, v in given.items():
    cfg[k] = v
  if cfg.source not in SOURCES:
    raise ValueError(f"unknown data source {cfg.source!r}; valid: {', '.join(SOURCES)}")
  if cfg.pref_kind is not None and cfg.pref_kind not in PREF_KINDS:
    raise ValueError(f"unknown pref_kind {cfg.pref_kind!r}; valid: None (SFT), {', '.join(PREF_KINDS)}")
  _formats.check_format(cfg.format, cfg.pref_kind)
  if cfg.source == "builtin":
    synthetic.get_task(cfg.task)  # raises with the valid names
  elif cfg.source in ("jsonl", "parquet", "array_record") and not cfg.path:
    raise ValueError(f"source={cfg.source!r} needs config.path")
  elif cfg.source == "tfds" and not cfg.name:
    raise ValueError(f"source={cfg.source!r} needs config.name")
  elif cfg.source == "hf" and not (cfg.name or cfg.path):
    raise ValueError(f"source={cfg.source!r} needs config.name (a dataset name, a directory written by "
                     f"save_to_disk, or a builder such as 'json' with config.path)")
  return cfg


def is_train(split: str) -> bool:
  return split.startswith("train")


def get_tokenizer(config):
  """CharTokenizer for the built-in tasks (or `tokenizer="char"`), else `load_tokenizer(config.tokenizer)`."""
  cfg = resolve(config)
  if cfg.tokenizer == "char" or (cfg.tokenizer is None and cfg.source == "builtin"):
    return synthetic.CharTokenizer()
  if cfg.tokenizer is None:
    raise ValueError(f"source={cfg.source!r} needs config.tokenizer (a tokenizer directory, or 'char')")
  from data._tokenizers import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(cfg.tokenizer)


def split_files(config, split: str) -> list[str]:
  """The files a file source reads for `split` ([] for sources that are not files); raises ValueError or
  FileNotFoundError naming the path, before anything is read."""
  cfg = resolve(config)
  if cfg.source in ("jsonl", "parquet", "array_record") or (cfg.source == "hf" and cfg.path):
    return _sources.expand(file_path(cfg, split))
  return []


def file_path(cfg, split: str) -> str:
  if "{split}" in cfg.path:
    return cfg.path.format(split=split)
  if not is_train(split):
    raise ValueError(f"config.path {cfg.path!r} has no '{{split}}' placeholder, so it cannot name the "
                     f"{split!r} split; write e.g. 'data/{{split}}.jsonl'")
  return cfg.path


def make_source(config, split: str):
  """The random-access record source of a split, before any subsetting."""
  cfg = resolve(config)
  if cfg.source == "builtin":
    canonical = synthetic.canonical_split(split)
    size = cfg.train_size if canonical == "train" else cfg.eval_size
    size = size or (BUILTIN_TRAIN_SIZE if canonical == "train" else BUILTIN_EVAL_SIZE)
    if cfg.pref_kind:
      return _sources.ListSource(_builtin_preference(cfg, canonical, size),
                                 f"builtin:{cfg.task}/{cfg.pref_kind}/{canonical}")
    records = synthetic.generate(cfg.task, canonical, size, seed=cfg.data_seed,
                                  min_digits=cfg.min_digits, max_digits=cfg.max_digits,
                                  eval_fraction=cfg.eval_fraction)
    return _sources.ListSource(records, f"builtin:{cfg.task}/{canonical}")
  if cfg.source == "jsonl":
    return _sources.files(_sources.JsonlSource, file_path(cfg, split))
  if cfg.source == "parquet":
    return _sources.files(_sources.ParquetSource, file_path(cfg, split))
  if cfg.source == "array_record":
    return _sources.ArrayRecordSource(file_path(cfg, split))
  if cfg.source == "tfds":
    return _sources.TfdsSource(cfg.name, split, cfg.data_dir)
  files = _sources.expand(file_path(cfg, split)) if cfg.path else None
  return _sources.HFSource(cfg.name or "json", split, config_name=cfg.hf_config, data_dir=cfg.data_dir,
                           data_files=files)


def _builtin_preference(cfg, split: str, size: int) -> list[dict]:
  fields = {k: cfg[f"{k}_field"] for k in ("prompt", "chosen", "rejected", "completion", "label",
                                            "responses", "scores")}
  return synthetic.generate_preference(
      cfg.task, split, size, cfg.pref_kind, seed=cfg.data_seed, list_size=cfg.list_size,
      desirable_fraction=cfg.desirable_fraction, min_digits=cfg.min_digits, max_digits=cfg.max_digits,
      eval_fraction=cfg.eval_fraction, fields=fields)


def indices(cfg, source, split: str) -> np.ndarray:
  """All records, or a `data_seed`-chosen subset of `train_size` / `eval_size` (kept in file order)."""
  n = len(source)
  size = cfg.train_size if is_train(split) else cfg.eval_size
  if cfg.source == "builtin" or size is None or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(cfg.data_seed).permutation(n)[:size])


def record_format(cfg, source) -> str:
  """`cfg.format`, or the format detected from the first readable record of `source` (printed once)."""
  if cfg.format != "auto":
    return cfg.format
  if cfg.source == "builtin":
    return "fields"
  fmt = "fields"
  for i in range(min(len(source), 8)):
    try:
      record = source[i]
    except _sources.DataError:
      continue
    fmt = _formats.detect(record, cfg)
    break
  where = source.where(0)[0] if len(source) else repr(cfg.path or cfg.name)
  key = (where, fmt, cfg.pref_kind)
  if key not in _ANNOUNCED:
    _ANNOUNCED.add(key)
    print(f"data: {where} read as format {fmt!r} (detected from the fields of its first record; "
          f"set data.format to choose)")
  return fmt


_ANNOUNCED: set = set()


class ChatTemplate:
  """The chat template of the config (or the tokenizer) and its special-token variables, looked up at
  the first conversation (the tokenizer is loaded then, from `cfg.tokenizer`, when none is given)."""

  def __init__(self, cfg, tokenizer=None):
    self.cfg, self.tokenizer, self._setup = cfg, tokenizer, None

  def setup(self) -> tuple[Any, str | None, dict]:
    """(tokenizer or None, template or None, variables)."""
    if self._setup is None:
      tok = self.tokenizer
      if tok is None and (self.cfg.tokenizer or self.cfg.source == "builtin"):
        tok = get_tokenizer(self.cfg)
      self._setup = (tok,) + chat_setup(self.cfg, tok)
    return self._setup

  @property
  def available(self) -> bool:
    return bool(self.setup()[1])

  def _template(self) -> str:
    template = self.setup()[1]
    if not template:
      raise ValueError("the records are conversations but there is no chat template: set "
                       "config.chat_template or use a tokenizer that has one")
    return template

  def render_split(self, messages, **kwargs) -> tuple[str, str]:
    """(prompt, last turn) of a conversation ending with the assistant's message (`data._sft.render_chat`);
    `kwargs`: more template variables (a record's `tools`)."""
    return _sft.render_chat(messages, self._template(), {**self.setup()[2], **kwargs})

  def generation_prompt(self, messages) -> str:
    """The conversation up to the generation prompt, without the template's leading bos text."""
    return self.strip_bos(_turns.render(self._template(), messages, True, self.setup()[2]))

  def strip_bos(self, prompt: str) -> str:
    """A rendered prompt without the template's leading bos token text: generation encodes prompts with
    `data.encode_prompt` (or `add_bos=True`), which adds bos when the tokenizer does."""
    bos = self.setup()[2].get("bos_token")
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


def chat_setup(cfg, tokenizer) -> tuple[str | None, dict]:
  """(chat template, its special-token variables) from the config or the tokenizer."""
  template = cfg.chat_template or getattr(tokenizer, "chat_template", None)
  # Template variables: `load_tokenizer`'s tokenizers keep {"bos": "<s>", "eos": "</s>", ...}.
  specials = getattr(tokenizer, "special_tokens", None) or {}
  return template, {f"{k}_token": v for k, v in specials.items() if v is not None}


