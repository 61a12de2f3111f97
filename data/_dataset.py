"""The entry points: `default_config`, `get_tokenizer`, `get_dataset`, `eval_examples`.

    cfg = data.default_config()                 # config.data in an experiment config
    cfg.task = "sort"                           # or cfg.source = "jsonl"; cfg.path = "sft_{split}.jsonl"
    tok = data.get_tokenizer(cfg)
    ds = data.get_dataset(cfg, "train", tokenizer=tok, batch_size=32, seq_len=128, seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()
    pairs, check = data.eval_examples(cfg, "test", n=200)   # exact-match eval by generation

With `cfg.pref_kind` set ("pairwise" | "unpaired" | "listwise") `get_dataset` builds preference batches
(`data._preference`) and the built-in source yields preference records (`data._pref_synthetic`).

A wrong key in the config fails at once with the valid keys listed.
"""
from __future__ import annotations

from typing import Any, Callable

from data import _config
from data import _preference
from data import _sft
from data import _synthetic
from data._pipeline import SFTDataset


def _text_fn(cfg, tokenizer) -> Callable[[Any], tuple[str, str]]:
  template, specials = _config.chat_setup(cfg, tokenizer)
  return lambda record: _sft.record_text(
      record, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
      messages_field=cfg.messages_field, chat_template=template, special_tokens=specials)


def get_dataset(config, split: str, *, tokenizer, batch_size: int, seq_len: int, seed: int = 0,
                train: bool | None = None, process_index: int = 0,
                process_count: int = 1) -> SFTDataset:
  """Packed SFT batches of a split: endless and shuffled when `train` (default: split "train..."),
  else one pass in order. Every record is read, checked and tokenized here, once.

  With `config.pref_kind` set, the preference batches of `data.get_preference_dataset` instead."""
  cfg = _config.resolve(config)
  if cfg.pref_kind:
    return _preference.get_preference_dataset(cfg, split, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
                                  seed=seed, train=train, process_index=process_index,
                                  process_count=process_count)
  train = _config.is_train(split) if train is None else train
  source = _config.make_source(cfg, split)
  text = _text_fn(cfg, tokenizer)

  def encode(record):
    prompt, response = text(record)
    return _sft.encode_sft(prompt, response, tokenizer, seq_len=seq_len,
                           max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                           truncate=cfg.truncate)

  examples, report = _sft.build_examples(source, _config.indices(cfg, source, split), encode,
                                         skip_invalid=cfg.skip_invalid)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return SFTDataset(examples, batch_size=batch_size, seq_len=seq_len, seed=seed, train=train,
                    packing=cfg.packing, pad_id=pad_id, process_index=process_index,
                    process_count=process_count, report=report)


def eval_examples(config, split: str, n: int | None = None
                  ) -> tuple[list[tuple[str, str]], Callable[[str, str], bool]]:
  """The first `n` (prompt, answer) pairs of a split and a verifier `check(prompt, response) -> bool`.

  Built-in tasks verify by recomputing the answer from the prompt; other sources by exact match with
  the record's response (any of them, if a prompt repeats). Invalid records raise, or are skipped with
  `skip_invalid`, as in `get_dataset`. Preference data (`pref_kind`) gives its preferred responses
  (`data._preference.best_response`).
  """
  cfg = _config.resolve(config)
  if cfg.pref_kind:
    return preference_generation_examples(cfg, split, n)
  if cfg.source == "builtin" and n is not None:
    with cfg.unlocked():
      cfg.eval_size = n   # generation is prefix-stable: the first n of any larger eval set
  source = _config.make_source(cfg, split)
  tokenizer = _config.get_tokenizer(cfg) if cfg.messages_field else None
  text = _text_fn(cfg, tokenizer)
  pairs, _ = _sft.build_examples(source, _config.indices(cfg, source, split)[:n], text,
                                 skip_invalid=cfg.skip_invalid)
  if cfg.source == "builtin":
    return pairs, _synthetic.get_task(cfg.task).check
  return pairs, _exact_match_verifier(pairs)


def preference_generation_examples(config, split: str, n: int | None = None
                                   ) -> tuple[list[tuple[str, str]], Callable[[str, str], bool]]:
  """`data.eval_examples` for preference data: (prompt, best response) pairs and a verifier.

  Built-in tasks give the SFT pairs of the same problems and the task's verifier; other sources the best
  response of each of the first `n` records (unpaired: desirable records only) and exact match.
  """
  cfg = _preference.preference_config(config)
  if cfg.source == "builtin":
    return eval_examples({**cfg.to_dict(), "pref_kind": None}, split, n)
  pairs = [(r.prompt, _preference.best_response(r)) for r in _preference.preference_eval_examples(cfg, split, n)]
  pairs = [(p, a) for p, a in pairs if a is not None]
  return pairs, _exact_match_verifier(pairs)


def _exact_match_verifier(pairs) -> Callable[[str, str], bool]:
  """check(prompt, response): the response equals one of the prompt's answers (a prompt may repeat)."""
  answers: dict[str, set] = {}
  for prompt, answer in pairs:
    answers.setdefault(prompt, set()).add(answer)
  return lambda prompt, response: response in answers.get(prompt, ())
