"""SFT examples: record -> (prompt, response) text -> token ids with a loss weight per token.

    tokens  = [bos] + prompt + response + [eos]
    weights = [0]   + 0...0  + 1......1 + [1]       1 where the token is one the model must learn

The loss is on the response and its end (the packer turns `weights` into the target mask).

**Tokenization follows the checkpoint** (as TRL 1.16 tokenizes; data/FORMATS.md):
  - the text is tokenized whole (prompt + response, as rendered) and the response starts where the
    tokens of the prompt alone stop agreeing with it (TRL's `common_prefix_length`);
  - bos leads the sequence when the tokenizer's own configuration adds it (`adds_bos`: `add_bos_token`,
    the post-processor of tokenizer.json) or the text already starts with it (a chat template's own
    `bos_token`), and never twice; a tokenizer without a bos token gets none;
  - the end: plain text gets the eos id unless the response already ends with it (TRL appends the eos
    token to completions); a rendered chat turn is taken as the template renders it, its end-of-turn
    token and whatever follows it up to the next turn (`<|im_end|>\n`, `<end_of_turn>\n`) being part
    of the response, and gets the eos id only when it holds no end-of-turn (special) token at all, so
    the model always learns to stop. The CharTokenizer (built-in tasks) always starts with bos and
    ends with eos, as before.

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
the response is what the full rendering adds after it; by default only that final turn is learned
(`data._turns` gives every assistant turn, or every token, for `assistant_only_loss` /
`completion_only_loss=False`). The template gets the tokenizer's special tokens, `bos_token` included;
a rendered eos token that ends the response is cut from the text (the eos id is appended instead).

Preference data maps one record to K such sequences (chosen/rejected or a list) with the same rules.
"""
from __future__ import annotations

import collections
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from data._sources import DataError

REASONS = ("bad_json", "bad_encoding", "empty_file", "wrong_type", "missing_field", "bad_messages", "empty_response", "unencodable",
           "too_long", "empty_after_truncation", "bad_aligned_logps")


class Example(NamedTuple):
  tokens: np.ndarray    # [n] int32: bos, prompt, response, eos
  weights: np.ndarray   # [n] float32: 1.0 where the token is a learned target (response, eos)


class AlignedExample(NamedTuple):
  """An `Example` (its first two fields) with `aligned_logps_field`'s numbers: the completion's summed
  log-probs under M aligned models, precomputed into the record (`configs/precompute.py`); PoFT reads them
  as batch["aligned_logps"] [B, 1, M]."""
  tokens: np.ndarray
  weights: np.ndarray
  aligned_logps: np.ndarray   # [M] float32


def aligned_logps(record: Any, field: str) -> np.ndarray:
  """The record's precomputed aligned log-probs: a list of finite numbers (or one number)."""
  value = record.get(field) if isinstance(record, dict) else None
  if value is None:
    raise DataError("missing_field", f"the record has no {field!r} (aligned_logps_field)")
  values = list(value) if isinstance(value, (list, tuple)) else [value]
  if not values or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values):
    raise DataError("bad_aligned_logps", f"{field!r} must hold one or more finite numbers, got {value!r}")
  return np.asarray(values, np.float32)


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
      raise DataError("bad_messages", f"{name!r}: message {k} is not a {{'role': str, 'content': str}}")
  if msgs[-1]["role"] != "assistant":
    raise DataError("bad_messages", f"the last message is from {msgs[-1]['role']!r}, not 'assistant'")
  return msgs


def render_chat(messages: list[dict], template: str, special_tokens: dict | None = None) -> tuple[str, str]:
  """(prompt, response) of a chat whose last message is the assistant's.

  `special_tokens` are template variables such as `bos_token` and `eos_token`; a trailing `eos_token` is
  cut from the response, as `encode_sft` appends the eos id to a turn that has no end-of-turn token.
  """
  import jinja2  # pylint: disable=g-import-not-at-top
  from data._chat import apply_chat_template  # pylint: disable=g-import-not-at-top
  variables = dict(special_tokens or {})
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


def adds_bos(tokenizer) -> bool:
  """Whether the tokenizer's own configuration starts a sequence with bos (`add_bos_token`; True for a
  tokenizer that does not say, as long as it has a bos token)."""
  if getattr(tokenizer, "bos_id", None) is None:
    return False
  flag = getattr(tokenizer, "add_bos_token", None)
  return True if flag is None else bool(flag)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
  """A generation prompt as training sees it: bos by the rules above (once), then the prompt."""
  ids = list(tokenizer.encode(prompt))
  bos = tokenizer.bos_id
  if bos is not None and adds_bos(tokenizer) and not (ids and ids[0] == bos):
    ids = [bos] + ids
  return ids


def _ends_turn(response: Sequence[int], tokenizer, chat: bool) -> bool:
  """Whether the response already carries its end: an end-of-turn (special) token for a chat turn, a
  final eos id for plain text."""
  if chat:
    ends = getattr(tokenizer, "special_ids", None)
    ends = set(ends if ends is not None else ()) | {tokenizer.eos_id}
    return any(t in ends for t in response)
  return bool(response) and response[-1] == tokenizer.eos_id


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def assemble(ids: Sequence[int], start: int, tokenizer, *, seq_len: int, chat: bool = False,
             prompt_weights: Sequence[float] | None = None, max_prompt_len: int | None = None,
             max_response_len: int | None = None, truncate: bool = True) -> Example:
  """The example of a tokenized text whose response starts at token `start`: bos, the end and the
  truncation rules of the module docstring. `prompt_weights` (default 0) mark learned prompt tokens
  (earlier assistant turns with `assistant_only_loss`)."""
  ids = [int(t) for t in ids]
  pw = [0.0] * start if prompt_weights is None else [float(w) for w in prompt_weights]
  bos = tokenizer.bos_id
  lead = []
  if bos is not None and ids and ids[0] == bos:       # the template's own bos
    lead, ids, pw, start = [bos], ids[1:], pw[1:], max(start - 1, 0)
  elif adds_bos(tokenizer):
    lead = [bos]
  p, r, pw = ids[:start], ids[start:], pw[:start]
  if not r:
    raise DataError("empty_response", "the response encodes to no tokens")
  if max_prompt_len is not None and len(p) > max_prompt_len:
    p, pw = p[len(p) - max_prompt_len:], pw[len(pw) - max_prompt_len:]
    TRUNCATED["prompt"] += 1
  content = len(r)
  if tokenizer.eos_id is not None and not _ends_turn(r, tokenizer, chat):
    r = r + [tokenizer.eos_id]
  if max_response_len is not None and content > max_response_len:
    r = r[:max_response_len]
    TRUNCATED["response"] += 1
  room = seq_len - len(lead) - len(p)
  if len(r) > room:
    if not truncate:
      raise DataError("too_long", f"{len(lead) + len(p) + len(r)} tokens > seq_len {seq_len} "
                      f"(prompt {len(p)}, response {len(r)} with its end)")
    if room < 1:
      raise DataError("empty_after_truncation", f"the prompt ({len(p)} tokens) leaves no room for the "
                      f"response in seq_len {seq_len}; set max_prompt_len")
    r = r[:room]
    TRUNCATED["response"] += 1
  tokens = np.asarray(lead + p + r, np.int32)
  weights = np.asarray([0.0] * len(lead) + list(pw) + [1.0] * len(r), np.float32)
  return Example(tokens, weights)


def split_tokens(tokenizer, prompt: str, responses: Sequence[str]) -> tuple[list[list[int]], int]:
  """Tokens of each `prompt + response` and where the responses start: the shortest common prefix of
  the prompt's own tokens with each (TRL's DPO split: one prompt length for all responses)."""
  p = _encode(tokenizer, prompt, "prompt")
  fulls = [_encode(tokenizer, prompt + r, "response") for r in responses]
  start = min((common_prefix_length(p, f) for f in fulls), default=len(p))
  return fulls, start


def encode_segments(segments: Sequence[tuple[str, bool]], tokenizer, *, seq_len: int, chat: bool = False,
                    max_prompt_len: int | None = None, max_response_len: int | None = None,
                    truncate: bool = True) -> Example:
  """Text pieces, each learned or not, in order; the last piece is the response (learned)."""
  if not segments or not segments[-1][0]:
    raise DataError("empty_response", "the response is empty")
  if not segments[-1][0].strip():
    raise DataError("empty_response", "the response is only whitespace")
  text = "".join(t for t, _ in segments)
  prefixes, pos = [], 0
  for t, _ in segments[:-1]:
    pos += len(t)
    prefixes.append(_encode(tokenizer, text[:pos], "prompt"))
  full = _encode(tokenizer, text, "response")
  bounds = []
  for prefix in prefixes:
    bounds.append(max([common_prefix_length(prefix, full)] + bounds))
  start = bounds[-1] if bounds else 0
  weights = np.zeros(start, np.float32)
  edges = [0] + bounds
  for k, (_, learned) in enumerate(segments[:-1]):
    weights[edges[k]:edges[k + 1]] = float(learned)
  return assemble(full, start, tokenizer, seq_len=seq_len, chat=chat, prompt_weights=weights,
                  max_prompt_len=max_prompt_len, max_response_len=max_response_len, truncate=truncate)


def encode_sft(prompt: str, response: str, tokenizer, *, seq_len: int,
               max_prompt_len: int | None = None, max_response_len: int | None = None,
               truncate: bool = True, chat: bool = False) -> Example:
  """Tokens and loss weights of one SFT example under the rules in the module docstring; `chat`: the
  response is a rendered chat turn (its end is what the template renders)."""
  if not response:
    raise DataError("empty_response", "the response is empty")
  if not response.strip():
    raise DataError("empty_response", "the response is only whitespace")
  (full,), start = split_tokens(tokenizer, prompt, [response])
  return assemble(full, start, tokenizer, seq_len=seq_len, chat=chat, max_prompt_len=max_prompt_len,
                  max_response_len=max_response_len, truncate=truncate)


# ------------------------------------------------------------------------------------------------
# Source -> examples, with validation.
# ------------------------------------------------------------------------------------------------

# Sequences cut by the truncation rules (kept, not skipped), per part; `build_examples` reports its share.
TRUNCATED: collections.Counter = collections.Counter()


class SkipReport:
  """Records left out with `skip_invalid=True`: a count per reason and the first place of each."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.first: dict[str, str] = {}
    self.by_file: collections.Counter = collections.Counter()   # (reason, file) -> records skipped
    self.total = 0   # records looked at
    self.kept: list[int] = []   # the source index of every example, in order (to name a batch's records)
    self.where = None           # source.where: index -> (file, 1-based line)
    self.truncated: collections.Counter = collections.Counter()   # kept sequences cut: prompt / response

  def add(self, err: DataError) -> None:
    self.counts[err.reason] += 1
    self.by_file[(err.reason, err.file or "<unknown>")] += 1
    self.first.setdefault(err.reason, str(err))

  def locate(self, example: int) -> str:
    """'file:line' of the record example `example` came from."""
    if self.where is None or not 0 <= example < len(self.kept):
      return f"example {example}"
    file, line = self.where(self.kept[example])
    return f"{file}:{line}"

  def as_dict(self) -> dict:
    """Counts for summary.json: records looked at, skipped per reason, per reason and file, and the first
    place of each reason."""
    files: dict = {}
    for (reason, file), n in sorted(self.by_file.items()):
      files.setdefault(reason, {})[file] = n
    return {"records": self.total, "skipped": self.skipped, "by_reason": dict(sorted(self.counts.items())),
            "by_file": files, "first": dict(self.first), "truncated": dict(sorted(self.truncated.items()))}

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    if not self.counts:
      return f"0 of {self.total} records skipped" + self._truncated()
    parts = [f"{r}={n} (first: {self.first[r]})" for r, n in sorted(self.counts.items())]
    return f"{self.skipped} of {self.total} records skipped: " + "; ".join(parts) + self._truncated()

  def _truncated(self) -> str:
    if not self.truncated:
      return ""
    return "; sequences truncated (kept): " + ", ".join(f"{k}={n}" for k, n in sorted(self.truncated.items()))

  def __repr__(self):
    return f"SkipReport({dict(self.counts)}, total={self.total})"


def build_examples(source, indices: Sequence[int], encode: Callable[[Any], Example], *,
                   skip_invalid: bool = False) -> tuple[list[Example], SkipReport]:
  """`encode(source[i])` for each index, raising (or counting, with `skip_invalid`) located errors."""
  report, examples = SkipReport(), []
  report.where = getattr(source, "where", None)
  if len(source) == 0:
    name = getattr(source, "path", None) or getattr(source, "name", None) or getattr(source, "paths", None)
    raise DataError("empty_file", "it holds no records", file=str(name))
  cut0 = collections.Counter(TRUNCATED)
  for i in indices:
    report.total += 1
    try:
      before = collections.Counter(TRUNCATED)
      examples.append(encode(source[i]))
      report.kept.append(int(i))
    except DataError as e:
      TRUNCATED.clear()
      TRUNCATED.update(before)      # a skipped record's cuts do not count
      if e.file is None:
        e = e.at(*source.where(i))
      if not skip_invalid:
        raise e from None
      report.add(e)
  report.truncated = TRUNCATED - cut0
  return examples, report
