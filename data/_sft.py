"""SFT examples: record -> (prompt, response) text -> token ids with a loss weight per token.

    tokens  = [bos] + prompt + response + [eos]
    weights = [0]   + 0...0  + 1......1 + [1]       1 where the token is one the model must learn

The loss is on the response and its eos only (the packer turns `weights` into the target mask).

**Truncation** (`seq_len` is the most tokens an example may have, bos and eos included):
  1. `max_prompt_len` keeps the *last* prompt tokens (the end of a prompt is nearest to the answer);
  2. `max_response_len` keeps the *first* response tokens;
  3. with `truncate=True` a response still too long for `seq_len` is cut from the right; with
     `truncate=False` such an example is invalid (`too_long`).
A cut response loses its eos: the model must not learn to stop where the text was cut (as TRL, which
truncates after appending eos). If the prompt leaves no room for one response token the example is
invalid (`empty_after_truncation`); set `max_prompt_len` to keep it.

**Validation.** Every problem is a `DataError` naming the file, the 1-based line and the reason, one of
`REASONS`. By default the first one raises; with `skip_invalid=True` invalid records are left out and
counted per reason in a `SkipReport` (the trainer prints `report.summary()`): nothing is dropped silently.

**Chat records** (`messages_field`): a list of `{"role", "content"}` whose last message is the
assistant's. The prompt is the template rendered over the earlier messages with the generation prompt,
the response is what the full rendering adds after it; only that final turn is learned. The template gets
the tokenizer's special tokens but `bos_token=""`: we add the bos id ourselves (and the eos id, so a
rendered eos token that ends the response is cut).

Preference data will map one record to K such sequences (chosen/rejected or a list) with the same rules.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from data._sources import DataError

REASONS = ("bad_json", "wrong_type", "missing_field", "bad_messages", "empty_response", "unencodable",
           "too_long", "empty_after_truncation")


class Example(NamedTuple):
  tokens: np.ndarray    # [n] int32: bos, prompt, response, eos
  weights: np.ndarray   # [n] float32: 1.0 where the token is a learned target (response, eos)


# ------------------------------------------------------------------------------------------------
# Record -> text.
# ------------------------------------------------------------------------------------------------

def _field(record: dict, name: str, kind: type | tuple[type, ...]) -> Any:
  if name not in record or record[name] is None:
    raise DataError("missing_field", f"no {name!r} field (fields: {sorted(record)})")
  value = record[name]
  if not isinstance(value, kind):
    want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise DataError("wrong_type", f"{name!r} must be {want}, got {type(value).__name__}")
  return value


def _messages(record: dict, name: str) -> list[dict]:
  msgs = _field(record, name, (list, dict))
  if isinstance(msgs, dict):  # columnar (TFDS Sequence features): {"role": [...], "content": [...]}
    try:
      msgs = [dict(zip(msgs, vals)) for vals in zip(*msgs.values(), strict=True)]
    except ValueError:
      raise DataError("bad_messages", f"{name!r} columns have different lengths") from None
  if not msgs:
    raise DataError("bad_messages", f"{name!r} is empty")
  for k, m in enumerate(msgs):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      raise DataError("bad_messages", f"message {k} is not a {{'role': str, 'content': str}}")
  if msgs[-1]["role"] != "assistant":
    raise DataError("bad_messages", f"the last message is from {msgs[-1]['role']!r}, not 'assistant'")
  return msgs


def render_chat(messages: list[dict], template: str, special_tokens: dict | None = None) -> tuple[str, str]:
  """(prompt, response) of a chat whose last message is the assistant's.

  `special_tokens` are template variables such as `eos_token`; `bos_token` is always "" because
  `encode_sft` adds the bos id, and a trailing `eos_token` is cut from the response for the same reason.
  """
  import jinja2  # pylint: disable=g-import-not-at-top
  from data._chat import apply_chat_template  # pylint: disable=g-import-not-at-top
  variables = {**(special_tokens or {}), "bos_token": ""}
  try:
    prompt = apply_chat_template(template, messages[:-1], add_generation_prompt=True, **variables)
    full = apply_chat_template(template, messages, add_generation_prompt=False, **variables)
  except jinja2.TemplateError as e:
    raise DataError("bad_messages", f"the chat template refused the conversation: {e}") from None
  if not full.startswith(prompt):
    raise DataError("bad_messages", "the chat template does not render the conversation as a "
                    "continuation of its prompt, so the response cannot be split off")
  response = full[len(prompt):]
  eos = variables.get("eos_token")
  if eos and response.endswith(eos):
    response = response[:-len(eos)]
  return prompt, response


def record_text(record: Any, *, prompt_field: str = "prompt", response_field: str = "response",
                messages_field: str | None = None, chat_template: str | None = None,
                special_tokens: dict | None = None) -> tuple[str, str]:
  """(prompt, response) text of one record, or a `DataError` without location."""
  if not isinstance(record, dict):
    raise DataError("wrong_type", f"a record must be a mapping, got {type(record).__name__}")
  if messages_field:
    if not chat_template:
      raise ValueError("messages_field is set but there is no chat template: set "
                       "config.chat_template or use a tokenizer that has one")
    return render_chat(_messages(record, messages_field), chat_template, special_tokens)
  return _field(record, prompt_field, str), _field(record, response_field, str)


# ------------------------------------------------------------------------------------------------
# Text -> tokens.
# ------------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str, what: str) -> list[int]:
  try:
    return list(tokenizer.encode(text))
  except ValueError as e:
    raise DataError("unencodable", f"{what}: {e}") from None


def encode_sft(prompt: str, response: str, tokenizer, *, seq_len: int,
               max_prompt_len: int | None = None, max_response_len: int | None = None,
               truncate: bool = True) -> Example:
  """Tokens and loss weights of one SFT example under the truncation rules in the module docstring."""
  if not response:
    raise DataError("empty_response", "the response is empty")
  p = _encode(tokenizer, prompt, "prompt")
  r = _encode(tokenizer, response, "response")
  if not r:
    raise DataError("empty_response", "the response encodes to no tokens")
  if max_prompt_len is not None and len(p) > max_prompt_len:
    p = p[len(p) - max_prompt_len:]
  r = r + [tokenizer.eos_id]
  if max_response_len is not None and len(r) - 1 > max_response_len:
    r = r[:max_response_len]
  room = seq_len - 1 - len(p)
  if len(r) > room:
    if not truncate:
      raise DataError("too_long", f"{1 + len(p) + len(r)} tokens > seq_len {seq_len} "
                      f"(prompt {len(p)}, response {len(r)} with eos)")
    if room < 1:
      raise DataError("empty_after_truncation", f"the prompt ({len(p)} tokens) leaves no room for the "
                      f"response in seq_len {seq_len}; set max_prompt_len")
    r = r[:room]
  tokens = np.asarray([tokenizer.bos_id] + p + r, np.int32)
  weights = np.zeros(len(tokens), np.float32)
  weights[1 + len(p):] = 1.0
  return Example(tokens, weights)


# ------------------------------------------------------------------------------------------------
# Source -> examples, with validation.
# ------------------------------------------------------------------------------------------------

class SkipReport:
  """Records left out with `skip_invalid=True`: a count per reason and the first place of each."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.first: dict[str, str] = {}
    self.total = 0   # records looked at

  def add(self, err: DataError) -> None:
    self.counts[err.reason] += 1
    self.first.setdefault(err.reason, str(err))

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    if not self.counts:
      return f"0 of {self.total} records skipped"
    parts = [f"{r}={n} (first: {self.first[r]})" for r, n in sorted(self.counts.items())]
    return f"{self.skipped} of {self.total} records skipped: " + "; ".join(parts)

  def __repr__(self):
    return f"SkipReport({dict(self.counts)}, total={self.total})"


def build_examples(source, indices: Sequence[int], encode: Callable[[Any], Example], *,
                   skip_invalid: bool = False) -> tuple[list[Example], SkipReport]:
  """`encode(source[i])` for each index, raising (or counting, with `skip_invalid`) located errors."""
  report, examples = SkipReport(), []
  for i in indices:
    report.total += 1
    try:
      examples.append(encode(source[i]))
    except DataError as e:
      if e.file is None:
        e = e.at(*source.where(i))
      if not skip_invalid:
        raise e from None
      report.add(e)
  return examples, report
