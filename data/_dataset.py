"""The entry points: `default_config`, `get_tokenizer`, `get_dataset`, `eval_examples`.

    cfg = data.default_config()                 # config.data in an experiment config
    cfg.task = "sort"                           # or cfg.source = "jsonl"; cfg.path = "sft_{split}.jsonl"
    tok = data.get_tokenizer(cfg)
    ds = data.get_dataset(cfg, "train", tokenizer=tok, batch_size=32, seq_len=128, seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()
    pairs, check = data.eval_examples(cfg, "test", n=200)   # exact-match eval by generation

With `cfg.pref_kind` set ("pairwise" | "unpaired" | "listwise") `get_dataset` builds preference batches
(`data._preference`) and the built-in source yields preference records (`synthetic.generate_preference`).

A wrong key in the config fails at once with the valid keys listed.
"""
from __future__ import annotations

from typing import Any, Callable

import synthetic
from data import _config
from data import _formats
from data import _preference
from data import _sft
from data import _turns
from data._pipeline import SFTDataset


def sft_encoder(cfg, tokenizer, fmt: str, *, seq_len: int) -> Callable[[Any], _sft.Example]:
  """record -> Example: the format's canonical record, its learned segments, their tokens."""
  template, specials = _config.chat_setup(cfg, tokenizer)

  def encode(record):
    canonical = _formats.sft_record(record, fmt, cfg)
    segments, chat = _turns.sft_segments(canonical, template, specials,
                                         completion_only_loss=cfg.completion_only_loss,
                                         assistant_only_loss=cfg.assistant_only_loss)
    return _sft.encode_segments(segments, tokenizer, seq_len=seq_len, chat=chat,
                                max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                truncate=cfg.truncate)
  return encode


def get_dataset(config, split: str, *, tokenizer, batch_size: int, seq_len: int, seed: int = 0,
                train: bool | None = None, process_index: int = 0,
                process_count: int = 1, packed_preferences: bool = False) -> SFTDataset:
  """Packed SFT batches of a split: endless and shuffled when `train` (default: split "train..."),
  else one pass in order. Every record is read, checked and tokenized here, once.

  With `config.pref_kind` set, the preference batches of `data.get_preference_dataset` instead
  (`packed_preferences`: its `packed`, padding-free rows per `config.pref_packing`; the trainer's stream)."""
  cfg = _config.resolve(config)
  if cfg.pref_kind:
    return _preference.get_preference_dataset(cfg, split, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
                                  seed=seed, train=train, process_index=process_index,
                                  process_count=process_count, packed=packed_preferences)
  train = _config.is_train(split) if train is None else train
  source = _config.make_source(cfg, split)
  encode = sft_encoder(cfg, tokenizer, _config.record_format(cfg, source), seq_len=seq_len)
  if cfg.aligned_logps_field:
    if cfg.packing != "none":
      raise ValueError(f"aligned_logps_field needs packing='none' (one example per row), got {cfg.packing!r}")
    encode_tokens = encode
    encode = lambda record: _sft.AlignedExample(*encode_tokens(record),
                                                _sft.aligned_logps(record, cfg.aligned_logps_field))
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
  the record's response (any of them, if a prompt repeats). For a conversation the prompt is the
  rendering up to the generation prompt without the template's leading bos text (encode it with
  `data.encode_prompt`) and the answer is the last assistant message's content, not its rendered turn.
  Invalid records raise, or are skipped with `skip_invalid`, as in `get_dataset`. Preference data
  (`pref_kind`) gives its preferred responses (`data._preference.best_response`).
  """
  cfg = _config.resolve(config)
  if cfg.pref_kind:
    return preference_generation_examples(cfg, split, n)
  if cfg.source == "builtin" and n is not None:
    with cfg.unlocked():
      cfg.eval_size = n   # generation is prefix-stable: the first n of any larger eval set
  source = _config.make_source(cfg, split)
  fmt, chat = _config.record_format(cfg, source), _config.ChatTemplate(cfg)

  def pair(record):
    prompt, answer = _eval_pair(_formats.sft_record(record, fmt, cfg))
    if isinstance(prompt, list):   # a conversation: its rendering up to the generation prompt
      prompt = chat.generation_prompt(prompt)
    return prompt, answer

  pairs, _ = _sft.build_examples(source, _config.indices(cfg, source, split)[:n], pair,
                                 skip_invalid=cfg.skip_invalid)
  if cfg.source == "builtin":
    return pairs, synthetic.get_task(cfg.task).check
  return pairs, _exact_match_verifier(pairs)


def _eval_pair(canonical: dict):
  found = _formats.prompt_and_answer(canonical)
  if found is None:
    raise ValueError("eval_examples needs records with a prompt and an answer; plain-text records "
                     "(format trl, field 'text') have none")
  return found


def preference_generation_examples(config, split: str, n: int | None = None
                                   ) -> tuple[list[tuple[str, str]], Callable[[str, str], bool]]:
  """`data.eval_examples` for preference data: (prompt, best response) pairs and a verifier.

  Built-in tasks give the SFT pairs of the same problems and the task's verifier; other sources the best
  response of each of the first `n` records (unpaired: desirable records only; chat records: the message
  content, the prompt without the template's bos text) and exact match.
  """
  cfg = _preference.preference_config(config)
  if cfg.source == "builtin":
    return eval_examples({**cfg.to_dict(), "pref_kind": None}, split, n)
  records, chat = _preference.preference_eval_examples(cfg, split, n), _config.ChatTemplate(cfg)
  pairs = [(chat.strip_bos(r.prompt) if r.chat else r.prompt, _preference.best_response(r)) for r in records]
  pairs = [(p, a) for p, a in pairs if a is not None]
  return pairs, _exact_match_verifier(pairs)


def _exact_match_verifier(pairs) -> Callable[[str, str], bool]:
  """check(prompt, response): the response equals one of the prompt's answers (a prompt may repeat)."""
  answers: dict[str, set] = {}
  for prompt, answer in pairs:
    answers.setdefault(prompt, set()).add(answer)
  return lambda prompt, response: response in answers.get(prompt, ())
