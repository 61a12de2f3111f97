"""Tokenizers of published checkpoints behind one small protocol.

    tok = load_tokenizer("path/to/checkpoint")     # tokenizer.json -> HFTokenizer; *.model -> SentencePiece
    ids = tok.encode("Hello", add_bos=True)
    text = tok.decode(ids)                          # special tokens skipped
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)

`encode` never adds special tokens on its own: a `tokenizer.json` may carry a post-processor that adds
BOS (transformers' `add_special_tokens=True` default), but packing and preference batches need to decide
that per segment, so `add_bos` / `add_eos` are explicit. `encode(t, add_bos=True)` therefore equals
transformers' `tok.encode(t)` for Llama-style tokenizers and `tok.encode(t, add_special_tokens=False)`
is `encode(t)`.

Whether the checkpoint's own tokenization adds BOS is `tok.add_bos_token`: `add_bos_token` of
`tokenizer_config.json` when it says, else whether the post-processor of `tokenizer.json` puts BOS in
front (transformers 5 follows the post-processor only; the two agree whenever the files do); for
SentencePiece `add_bos_token`, default True (as `LlamaTokenizer`). `tok.special_ids` are the ids of the
special tokens (end-of-turn markers among them), bos/pad/unk excluded. `data._sft` reads both.

Special tokens (bos/eos/pad/unk) come from `tokenizer_config.json` and `special_tokens_map.json`, merged
as transformers merges them; a SentencePiece model knows its own ids.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from data import _chat

_SPECIALS = ("bos", "eos", "pad", "unk")
_MARKER = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: Optional[int]
  eos_id: Optional[int]
  pad_id: Optional[int]

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ...


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_str(value: Any) -> Optional[str]:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _special_tokens(path: str) -> tuple[dict[str, Optional[str]], dict]:
  config = _read_json(os.path.join(path, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
  # transformers' rule: a config that lists `added_tokens_decoder` (written since transformers 4.34) is
  # complete; an older one is overridden by special_tokens_map.json.
  if "added_tokens_decoder" in config:
    special_map = {}
  tokens = {}
  for name in _SPECIALS:
    key = f"{name}_token"
    tokens[name] = _token_str(special_map.get(key)) or _token_str(config.get(key))
  return tokens, config


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization` (spaces before punctuation and English contractions)."""
  for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
               (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(a, b)
  return text


class _ChatMixin:
  chat_template: Optional[str] = None
  special_tokens: dict[str, Optional[str]] = {}

  def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
    """Renders messages with the checkpoint's template and this tokenizer's special tokens."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                       "chat_template.jinja); pass one to data.apply_chat_template")
    tokens = {f"{k}_token": v for k, v in self.special_tokens.items() if v is not None}
    return _chat.apply_chat_template(self.chat_template, messages, add_generation_prompt, **{**tokens, **kwargs})


def _concat(bos, ids, eos, add_bos, add_eos, what):
  for add, tid, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
    if add and tid is None:
      raise ValueError(f"add_{name}=True but the {what} has no {name} token")
  return ([bos] if add_bos else []) + list(ids) + ([eos] if add_eos else [])


class HFTokenizer(_ChatMixin):
  """A `tokenizer.json` (the `tokenizers` library), with special tokens and chat template beside it."""

  def __init__(self, tokenizer_file: str, special_tokens: Optional[Mapping[str, Optional[str]]] = None,
               chat_template: Optional[str] = None, clean_up_tokenization_spaces: bool = False,
               add_bos_token: Optional[bool] = None):
    from tokenizers import Tokenizer as _Tok   # pylint: disable=g-import-not-at-top
    self._tok = _Tok.from_file(tokenizer_file)
    self.special_tokens = {k: (special_tokens or {}).get(k) for k in _SPECIALS}
    self.chat_template = chat_template
    # transformers 5 never cleans BPE output up: the rule would eat real spaces before punctuation.
    self._clean_up = clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE"
    ids = {}
    for k, token in self.special_tokens.items():
      ids[k] = None if token is None else self._tok.token_to_id(token)
      if token is not None and ids[k] is None:
        raise ValueError(f"{k}_token={token!r} is not in the vocabulary of {tokenizer_file}")
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
    if add_bos_token is None:   # what the post-processor puts in front of an empty text
      front = self._tok.post_process(self._tok.encode("", add_special_tokens=False)).ids
      add_bos_token = bool(front) and front[0] == self.bos_id
    self.add_bos_token = bool(add_bos_token) and self.bos_id is not None
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self.special_ids = frozenset((special | {self.eos_id}) - {self.bos_id, self.pad_id, self.unk_id, None})

  @classmethod
  def from_dir(cls, path: str) -> "HFTokenizer":
    return load_tokenizer(os.path.join(path, "tokenizer.json"))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return _concat(self.bos_id, ids, self.eos_id, add_bos, add_eos, "tokenizer")

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)
    return _clean_up_tokenization(text) if self._clean_up else text

  def token_to_id(self, token: str) -> Optional[int]:
    return self._tok.token_to_id(token)


class SentencePieceTokenizer(_ChatMixin):
  """A SentencePiece `.model` file (Llama 1/2, Mistral v0.1, Gemma)."""

  def __init__(self, model_file: str, chat_template: Optional[str] = None, add_bos_token: Optional[bool] = None):
    import sentencepiece   # pylint: disable=g-import-not-at-top
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    self.chat_template = chat_template
    known = lambda i: i if i >= 0 else None   # sentencepiece says -1 for "none"
    self.bos_id, self.eos_id = known(self._sp.bos_id()), known(self._sp.eos_id())
    self.pad_id, self.unk_id = known(self._sp.pad_id()), known(self._sp.unk_id())
    self.special_tokens = {k: None if i is None else self._sp.id_to_piece(i)
                           for k, i in zip(_SPECIALS, (self.bos_id, self.eos_id, self.pad_id, self.unk_id))}
    self.add_bos_token = (True if add_bos_token is None else bool(add_bos_token)) and self.bos_id is not None
    # Control pieces, and user-defined ones that look like markers (`<end_of_turn>`): the Python API does
    # not tell user-defined pieces apart, but they are the marker-like pieces that encode to themselves
    # (after the dummy-prefix piece, if any).
    special = set()
    for i in range(self._sp.get_piece_size()):
      piece = self._sp.id_to_piece(i)
      if self._sp.is_control(i) or (_MARKER.fullmatch(piece) and not self._sp.is_byte(i)
                                    and self._sp.encode(piece)[-1:] == [i]):
        special.add(i)
    self.special_ids = frozenset((special | {self.eos_id}) - {self.bos_id, self.pad_id, self.unk_id, None})

  @classmethod
  def from_dir(cls, path: str) -> "SentencePieceTokenizer":
    return cls(_sentencepiece_file(path), _chat.load_chat_template(path), _config_add_bos(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return _concat(self.bos_id, self._sp.encode(text), self.eos_id, add_bos, add_eos, "SentencePiece model")

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special:
      return self._sp.decode(ids)
    # sentencepiece drops control pieces (<s>, </s>) when decoding; keep them as text between the runs.
    out, run = [], []
    for i in ids:
      if self._sp.is_control(i):
        out += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [self._sp.decode(run)])


def _sentencepiece_file(path: str) -> str:
  if os.path.isfile(path):
    return path
  named = os.path.join(path, "tokenizer.model")
  if os.path.exists(named):
    return named
  found = sorted(glob.glob(os.path.join(path, "*.model")))
  if not found:
    raise FileNotFoundError(f"no SentencePiece .model file in {path}")
  return found[0]


def _config_add_bos(folder: str) -> Optional[bool]:
  value = _read_json(os.path.join(folder, "tokenizer_config.json")).get("add_bos_token")
  return value if isinstance(value, bool) else None


def load_tokenizer(path: str) -> Tokenizer:
  """Picks by what `path` holds: `tokenizer.json` (preferred, as transformers' fast tokenizers do) or a
  SentencePiece `.model`; a path to either file works too."""
  if os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    if path.endswith(".json"):
      tokens, config = _special_tokens(folder)
      add_bos = config.get("add_bos_token")
      return HFTokenizer(path, tokens, _chat.load_chat_template(folder),
                         bool(config.get("clean_up_tokenization_spaces", False)),
                         add_bos if isinstance(add_bos, bool) else None)
    return SentencePieceTokenizer(path, _chat.load_chat_template(folder), _config_add_bos(folder))
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return HFTokenizer.from_dir(path)
  if os.path.exists(os.path.join(path, "tokenizer.model")) or glob.glob(os.path.join(path, "*.model")):
    return SentencePieceTokenizer.from_dir(path)
  held = sorted(os.listdir(path)) if os.path.isdir(path) else []
  raise FileNotFoundError(f"no tokenizer.json or SentencePiece .model in {path} (it holds: {held})")
