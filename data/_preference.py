r"""Preference data: a record -> K token sequences -> one [B, K, T] batch row per example.

    cfg = data.default_config(); cfg.pref_kind = "pairwise"       # builtin: synthetic pairs of cfg.task
    ds = data.get_dataset(cfg, "train", tokenizer=tok, batch_size=32, seq_len=64, seed=0)
    it = iter(ds); batch = next(it)          # inputs [32, 2, 64], ...; it.get_state() / set_state()
    records = data.preference_eval_examples(cfg, "test", n=200)   # validated PreferenceRecord texts
    batch = data.preference_batch(records[:8], cfg, tokenizer=tok, seq_len=64)

**Records** (`config.pref_kind`; every field name is a config option):

    pairwise   {"prompt", "chosen", "rejected"}                  K = 2: index 0 chosen, 1 rejected
    unpaired   {"prompt", "completion", "label"}                 K = 2 with `unpaired_kl` (below), else 1
    listwise   {"prompt", "responses": [...], "scores": [...]}   K = `list_size`
               or "ranks": [...] (1 = best, ties allowed) instead of scores: score = 1 - rank, so the
               best entry scores 0 and each rank below costs 1, the scale of the synthetic lists

Chat form: a prompt that is a list of {"role", "content"} messages (TRL's conversational format) is
rendered with the chat template; each response is then one assistant message (a string, a message, or a
list holding one message), and its text is what the template adds after the prompt's generation header,
as for SFT chat records (`data._sft.render_chat`).

Other formats (UltraFeedback, HH-RLHF, TRL's implicit prompt, ...) are turned into these records first
(`data._formats`, `config.format`; data/FORMATS.md).

**Batch.** Each response becomes the SFT example `bos + prompt + response + eos` (`data._sft.assemble`:
bos and the end as the checkpoint makes them, loss on the response and its end only) in a padded row of
its own (with `pref_packing` "packed" or "shared_prompt", training batches pack them into shared rows
instead: `data._pref_packing`). As in TRL's DPO, `prompt + response` is tokenized whole for each response and the
responses start after the shortest common prefix of the prompt's own tokens with each of them:

    inputs, targets, loss_mask, positions, segment_ids  [B, K, T]  as SFT rows: segment 1, positions from 0
    scores        [B, K]  float32   listwise labels, higher is better; 0 on padding entries
    list_mask     [B, K]  float32   listwise: 1 = a real entry; padding entries are empty rows (all masks 0)
    label         [B]     bool      unpaired: True = desirable
    ref_logps     [B, K]  float32   with `ref_logps_field`: reference log-probs precomputed per sequence
    e_x, e_c, e_r [B, D]  float32   pairwise, with `embeddings_field` ("x,c,r"): precomputed embeddings of
                                    the prompt, the chosen and the rejected response
    example_mask  [B]     float32   1 = a real example; 0 on the filler rows of the last eval batch

Worked example (CharTokenizer: bos 1, eos 2, "a" 13, "x" 36, "y" 37): prompt "a", chosen "xy",
rejected "y", T = 6 gives one row of K = 2 sequences:

    inputs       [[1 13 36 37  2  0],   [1 13 37  2  0  0]]
    targets      [[13 36 37  2  0  0],  [13 37  2  0  0  0]]
    loss_mask    [[0  1  1  1  0  0],   [0  1  1  0  0  0]]
    positions    [[0  1  2  3  4  0],   [0  1  2  3  0  0]]
    segment_ids  [[1  1  1  1  1  0],   [1  1  1  1  0  0]]

**Truncation** (T = seq_len, the most tokens of a sequence), the SFT rules applied to every response:
  1. `max_prompt_len` keeps the last prompt tokens (TRL's `max_prompt_length`, keep_end);
  2. `max_response_len` keeps the first tokens of each response (TRL's `max_completion_length`);
  3. a response still too long for T is cut from the right (TRL 1.x `max_length` with keep_start), and
     a cut response loses its eos; with `truncate=False` the record is invalid (`too_long`) instead.
So the prompt is cut (from the left) only by `max_prompt_len`, and the responses (from the right) so
that the prompt plus the longest response fits T. A prompt that leaves no room for a response token
makes the record invalid (`empty_after_truncation`; TRL drops such records).

**Validation.** Every problem is a `DataError` naming the file, the 1-based line and one of
`PREF_REASONS`. The first one raises; with `skip_invalid=True` the record is left out and counted in the
dataset's `report` (`report.summary()`).
  - missing_field / wrong_type: a field absent or of the wrong type (or a record that is not a mapping);
  - empty_response: an empty chosen, rejected or completion (or one that encodes to no token);
  - identical_responses: chosen == rejected, as text or after truncation (unless `allow_identical`);
  - bad_label: an unpaired label that is not a bool (or 0 / 1);
  - length_mismatch: scores (or ranks) and responses of different lengths;
  - bad_score: a score that is not a finite number, a rank that is not an integer >= 1;
  - too_few_responses: fewer than 2 valid list entries; list_too_long: more than `list_size`;
  - bad_ref_logps: precomputed reference log-probs that are not one finite number per sequence;
  - bad_embeddings: precomputed embeddings that are not lists of finite numbers of one length;
  - bad_json, bad_messages, unencodable, too_long, empty_after_truncation: as for SFT.
A list *entry* with an empty (or whitespace-only) response, a null / NaN score, or a response equal to an
earlier entry's (`duplicate_entry`, the first is kept) is dropped from its list and counted in
`report.dropped`; the list is invalid only when fewer than 2 entries remain.

**Lists to pairs** (`list_to_pairs`, for a pairwise loss on listwise data; without it the trainer refuses
that combination). Each valid list gives pairs (higher score, lower score) by one documented rule
(`list_pairs`): `best_worst` the top- against the bottom-scored entry, `all_pairs` every pair of
different scores, `adjacent` neighbours in score order. Tied pairs are left out and counted in
`report.dropped["tied_pair"]`, pairs of identical token sequences in `identical_pair`, lists that give no
pair in `list_without_pair`; the batches are then pairwise ([B, 2, T]).

**Unpaired KL pairs** (`unpaired_kl=True`, the default). KTO estimates z0 = KL(pi || pi_ref) on
mismatched pairs, so row b gets a second sequence: its own prompt with the completion of row b - 1 of the
same global batch (row 0 takes the last row's), as TRL's KTO pairs them; the completion is cut from the
right to fit T. Such a pair cannot carry a precomputed reference log-prob, so `ref_logps_field` needs
`unpaired_kl=False`. Precomputed `ref_logps` are used as given: they must come from the same tokenizer
and truncation.

**Iteration.** The SFT stream (`data._pipeline`: a seeded permutation per epoch, state {epoch,
position}) with one example per row: a batch is the next `batch_size` examples, so determinism and exact
resume carry over. Evaluation reads the split once, in order; the last batch is filled with copies of the
split's first examples marked `example_mask = 0`, copies rather than empty rows so that no loss meets a
zero-length sequence.
"""
from __future__ import annotations

import collections
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from data import _config
from data import _formats
from data import _packing
from data import _pipeline
from data import _pref_packing
from data import _sft
from data._pipeline import SFTDataset
from data._sft import Example, SkipReport
from data._sources import DataError

KINDS = _config.PREF_KINDS
LIST_TO_PAIRS = ("best_worst", "all_pairs", "adjacent")
PREF_REASONS = _sft.REASONS + ("identical_responses", "bad_label", "length_mismatch", "bad_score",
                               "too_few_responses", "list_too_long", "bad_ref_logps", "bad_embeddings")

Render = Callable[[list], tuple[str, str]]           # chat messages -> (prompt text, response text)


class Fields(NamedTuple):
  """Record field names (the `*_field` config options); `ref_logps` may be None or "a,b"."""
  prompt: str = "prompt"
  chosen: str = "chosen"
  rejected: str = "rejected"
  completion: str = "completion"
  label: str = "label"
  responses: str = "responses"
  scores: str = "scores"
  ranks: str = "ranks"
  ref_logps: str | None = None
  embeddings: str | None = None

  @classmethod
  def from_config(cls, cfg) -> "Fields":
    return cls(*(cfg.get(f"{f}_field") for f in cls._fields))


class PreferenceRecord(NamedTuple):
  """A validated record as text. `responses`: (chosen, rejected) | (completion,) | the list."""
  prompt: str
  responses: tuple[str, ...]
  scores: tuple[float, ...] | None = None      # listwise
  label: bool | None = None                    # unpaired
  ref_logps: tuple[float, ...] | None = None   # one per response, with ref_logps_field
  chat: bool = False                           # rendered with a chat template (its turns end themselves)
  answers: tuple[str, ...] | None = None       # chat: each response's message content (what a model generates)
  embeddings: tuple[tuple[float, ...], ...] | None = None   # pairwise: (e_x, e_c, e_r) with embeddings_field


class PreferenceExample(NamedTuple):
  seqs: tuple[Example, ...]        # one SFT example per response, in record order
  scores: np.ndarray | None        # [n] float32, listwise
  label: bool | None               # unpaired
  ref_logps: np.ndarray | None     # [n] float32
  embeddings: np.ndarray | None = None   # [3, D] float32: e_x, e_c, e_r (pairwise, embeddings_field)


class PreferenceReport(SkipReport):
  """`SkipReport` of the records left out, plus the list entries dropped per reason."""

  def __init__(self, report: SkipReport | None = None, dropped: collections.Counter | None = None):
    super().__init__()
    if report is not None:
      self.counts, self.first, self.total = report.counts, report.first, report.total
      self.by_file, self.kept, self.where = report.by_file, report.kept, report.where
      self.truncated = report.truncated
    self.dropped = collections.Counter(dropped or {})

  def as_dict(self) -> dict:
    return {**super().as_dict(), "list_entries_dropped": dict(sorted(self.dropped.items()))}

  def summary(self) -> str:
    s = super().summary()
    if self.dropped:
      s += "; list entries dropped: " + ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.items()))
    return s


# ------------------------------------------------------------------------------------------------
# Record -> text.
# ------------------------------------------------------------------------------------------------

def _present(record: dict, name: str) -> Any:
  if name not in record or record[name] is None:
    raise DataError("missing_field", f"no {name!r} field (fields: {sorted(record)})")
  return record[name]


def _message_list(value: Any, name: str) -> list:
  """A message list from a list, a columnar dict (TFDS: {"role": [...], "content": [...]}) or one message."""
  if isinstance(value, dict):
    if value and all(isinstance(v, list) for v in value.values()):
      try:
        return [dict(zip(value, vals)) for vals in zip(*value.values(), strict=True)]
      except ValueError:
        raise DataError("bad_messages", f"{name!r} columns have different lengths") from None
    return [value]
  return list(value)


def _response_text(value: Any, name: str, prompt_msgs: list | None, render: Render | None
                   ) -> tuple[str | None, str, str]:
  """(prompt text or None, response text, the message content) of one response; "" when it is empty."""
  if prompt_msgs is None:
    if not isinstance(value, str):
      raise DataError("wrong_type", f"{name!r} must be str, got {type(value).__name__}")
    return None, value, value
  if isinstance(value, str):
    msgs = [{"role": "assistant", "content": value}]
  elif isinstance(value, (list, dict)):
    msgs = _message_list(value, name)
  else:
    raise DataError("wrong_type", f"{name!r} must be a string or an assistant message, got "
                    f"{type(value).__name__}")
  if len(msgs) != 1:
    raise DataError("bad_messages", f"{name!r} must be one assistant message, got {len(msgs)} messages")
  full = _sft._messages({name: prompt_msgs + msgs}, name)  # pylint: disable=protected-access
  if not full[-1]["content"]:
    return None, "", ""
  if render is None:
    raise ValueError("a record is in chat form (its prompt is a list of messages) but no renderer was given")
  return (*render(full), full[-1]["content"])


def _score(x: Any, what: str, ranks: bool) -> float | None:
  """A finite score (1 - rank for ranks), or None for a null / NaN one."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return None
  if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isinf(x):
    raise DataError("bad_score", f"{what} must be a finite number, got {x!r}")
  if not ranks:
    return float(x)
  if x != int(x) or x < 1:
    raise DataError("bad_score", f"{what} must be an integer rank >= 1, got {x!r}")
  return 1.0 - float(x)


def _ref_logps(record: dict, spec: str, n: int) -> list[float]:
  """`n` precomputed reference log-probs: one field holding a list (or a number when n = 1), or one
  field per sequence ("a,b")."""
  names = [s.strip() for s in spec.split(",")]
  if len(names) == 1:
    value = _present(record, names[0])
    values = [value] if n == 1 and not isinstance(value, (list, tuple)) else value
    if not isinstance(values, (list, tuple)) or len(values) != n:
      raise DataError("bad_ref_logps", f"{names[0]!r} must hold {n} number(s), one per sequence, got "
                      f"{value!r}")
  else:
    values = [_present(record, k) for k in names]
  for v in values:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise DataError("bad_ref_logps", f"reference log-probs must be finite numbers, got {v!r}")
  return [float(v) for v in values]


def _embeddings(record: dict, spec: str) -> tuple[tuple[float, ...], ...]:
  """(e_x, e_c, e_r) from the three fields named by `spec` ("x,c,r"): lists of finite numbers, one length."""
  names = [s.strip() for s in spec.split(",")]
  out = []
  for name in names:
    value = _present(record, name)
    if (not isinstance(value, (list, tuple)) or not value
        or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) for v in value)):
      raise DataError("bad_embeddings", f"{name!r} must be a non-empty list of finite numbers")
    out.append(tuple(float(v) for v in value))
  if len({len(v) for v in out}) != 1:
    raise DataError("bad_embeddings", f"{', '.join(map(repr, names))} have different lengths "
                    f"{[len(v) for v in out]}")
  return tuple(out)


def record_preference(record: Any, kind: str, fields: Fields = Fields(), *, render: Render | None = None,
                      list_size: int = 4, allow_identical: bool = False
                      ) -> tuple[PreferenceRecord, collections.Counter]:
  """The text of one record and the list entries it dropped; a `DataError` (without location) if invalid."""
  if not isinstance(record, dict):
    raise DataError("wrong_type", f"a record must be a mapping, got {type(record).__name__}")
  prompt = _present(record, fields.prompt)
  extra = _formats.template_kwargs(record) if isinstance(prompt, (list, dict)) else {}
  if extra and render is not None:   # the record's tools / chat_template_kwargs, as TRL passes them
    render = functools.partial(render, **extra)
  prompt_msgs = None
  if isinstance(prompt, (list, dict)):
    prompt_msgs = _message_list(prompt, fields.prompt)
    if not prompt_msgs:
      raise DataError("bad_messages", f"{fields.prompt!r} is empty")
  elif not isinstance(prompt, str):
    raise DataError("wrong_type", f"{fields.prompt!r} must be str or a list of messages, got "
                    f"{type(prompt).__name__}")

  contents = []

  def texts(named_values):
    """(prompt text, response texts); a chat prompt's text comes from rendering a response."""
    prompt_text, out = (prompt if prompt_msgs is None else None), []
    for name, value in named_values:
      p, r, c = _response_text(value, name, prompt_msgs, render)
      prompt_text = p if p is not None else prompt_text
      out.append(r)
      contents.append(c)
    return prompt_text, out

  dropped = collections.Counter()
  scores = label = None
  if kind in ("pairwise", "unpaired"):
    names = (fields.chosen, fields.rejected) if kind == "pairwise" else (fields.completion,)
    prompt_text, responses = texts([(k, _present(record, k)) for k in names])
    for name, r in zip(names, responses):
      if not r.strip():
        raise DataError("empty_response", f"{name!r} is empty" + (" (only whitespace)" if r else ""))
    if kind == "pairwise" and responses[0] == responses[1] and not allow_identical:
      raise DataError("identical_responses", f"{fields.chosen!r} and {fields.rejected!r} are the same text")
    if kind == "unpaired":
      label = _present(record, fields.label)
      if not isinstance(label, bool) and not (isinstance(label, int) and label in (0, 1)):
        raise DataError("bad_label", f"{fields.label!r} must be a bool (or 0 / 1), got {label!r}")
      label = bool(label)
    refs = _ref_logps(record, fields.ref_logps, len(names)) if fields.ref_logps else None
  elif kind == "listwise":
    values = _present(record, fields.responses)
    if not isinstance(values, list):
      raise DataError("wrong_type", f"{fields.responses!r} must be a list, got {type(values).__name__}")
    use_ranks = record.get(fields.scores) is None
    label_field = fields.ranks if use_ranks else fields.scores
    if use_ranks and record.get(fields.ranks) is None:
      raise DataError("missing_field", f"no {fields.scores!r} or {fields.ranks!r} field (fields: "
                      f"{sorted(record)})")
    labels = record[label_field]
    if not isinstance(labels, list):
      raise DataError("wrong_type", f"{label_field!r} must be a list, got {type(labels).__name__}")
    if len(labels) != len(values):
      raise DataError("length_mismatch", f"{len(values)} {fields.responses!r} but {len(labels)} "
                      f"{label_field!r}")
    refs = _ref_logps(record, fields.ref_logps, len(values)) if fields.ref_logps else None
    label_values = [_score(x, f"{label_field}[{i}]", use_ranks) for i, x in enumerate(labels)]
    prompt_text, responses = texts([(f"{fields.responses}[{i}]", "" if v is None else v)
                                    for i, v in enumerate(values)])
    keep, seen = [], set()
    for i, (r, s) in enumerate(zip(responses, label_values)):
      if not r.strip():
        dropped["empty_response"] += 1
      elif s is None:
        dropped["missing_score"] += 1
      elif r in seen:           # the same response twice: the first is kept
        dropped["duplicate_entry"] += 1
      else:
        seen.add(r)
        keep.append(i)
    if len(keep) < 2:
      raise DataError("too_few_responses", f"{len(keep)} valid responses of {len(values)} (a list needs 2; "
                      f"dropped: {dict(dropped)})")
    if len(keep) > list_size:
      raise DataError("list_too_long", f"{len(keep)} valid responses > list_size {list_size}")
    responses = [responses[i] for i in keep]
    contents[:] = [contents[i] for i in keep]
    scores = tuple(label_values[i] for i in keep)
    refs = [refs[i] for i in keep] if refs else None
  else:
    raise ValueError(f"unknown preference kind {kind!r}; valid: {', '.join(KINDS)}")
  chat = prompt_msgs is not None
  embeddings = _embeddings(record, fields.embeddings) if fields.embeddings and kind == "pairwise" else None
  return PreferenceRecord(prompt_text, tuple(responses), scores, label, tuple(refs) if refs else None, chat,
                          tuple(contents) if chat else None, embeddings), dropped


# ------------------------------------------------------------------------------------------------
# Text -> tokens.
# ------------------------------------------------------------------------------------------------

def encode_preference(rec: PreferenceRecord, tokenizer, kind: str, *, seq_len: int,
                      max_prompt_len: int | None = None, max_response_len: int | None = None,
                      truncate: bool = True, allow_identical: bool = False
                      ) -> tuple[PreferenceExample, collections.Counter]:
  """One SFT example per response under the truncation rules of the module docstring."""
  seqs, keep, dropped = [], [], collections.Counter()
  nonempty = [i for i, r in enumerate(rec.responses) if r]
  fulls, start = _sft.split_tokens(tokenizer, rec.prompt, [rec.responses[i] for i in nonempty])
  tokens = dict(zip(nonempty, fulls))
  for i, response in enumerate(rec.responses):
    try:
      if i not in tokens:
        raise DataError("empty_response", "the response is empty")
      seqs.append(_sft.assemble(tokens[i], start, tokenizer, seq_len=seq_len, chat=rec.chat,
                                max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                                truncate=truncate))
    except DataError as e:
      if kind == "listwise" and e.reason == "empty_response":
        dropped[e.reason] += 1
        continue
      raise
    keep.append(i)
  if kind == "listwise" and len(seqs) < 2:
    raise DataError("too_few_responses", f"{len(seqs)} responses encode to tokens (a list needs 2)")
  if (kind == "pairwise" and not allow_identical and np.array_equal(seqs[0].tokens, seqs[1].tokens)):
    raise DataError("identical_responses", f"chosen and rejected are the same {len(seqs[0].tokens)} tokens "
                    f"after truncation to seq_len {seq_len}")
  pick = lambda v: None if v is None else np.asarray(v, np.float32)[keep]
  emb = None if rec.embeddings is None else np.asarray(rec.embeddings, np.float32)
  return PreferenceExample(tuple(seqs), pick(rec.scores), rec.label, pick(rec.ref_logps), emb), dropped


def list_pairs(scores: Sequence[float], rule: str) -> tuple[list[tuple[int, int]], int]:
  """(chosen index, rejected index) pairs of a scored list under `rule` (`LIST_TO_PAIRS`), the higher
  score first, and the number of tied pairs the rule met and left out.

    best_worst  the highest- against the lowest-scored entry (the first of each in list order)
    all_pairs   every pair of entries with different scores, in list order
    adjacent    neighbours in descending score order (a stable sort: equal scores keep list order)
  """
  s = [float(x) for x in scores]
  if rule == "best_worst":
    hi, lo = int(np.argmax(s)), int(np.argmin(s))
    return ([(hi, lo)], 0) if s[hi] > s[lo] else ([], 1)
  if rule == "all_pairs":
    pairs, ties = [], 0
    for i in range(len(s)):
      for j in range(i + 1, len(s)):
        if s[i] == s[j]:
          ties += 1
        else:
          pairs.append((i, j) if s[i] > s[j] else (j, i))
    return pairs, ties
  if rule == "adjacent":
    order = sorted(range(len(s)), key=lambda i: -s[i])
    pairs, ties = [], 0
    for a, b in zip(order, order[1:]):
      if s[a] == s[b]:
        ties += 1
      else:
        pairs.append((a, b))
    return pairs, ties
  raise ValueError(f"list_to_pairs={rule!r}; valid: {', '.join(LIST_TO_PAIRS)}")


def to_pairs(ex: PreferenceExample, rule: str, allow_identical: bool = False
             ) -> tuple[list[PreferenceExample], collections.Counter]:
  """The pairwise examples of a listwise one (`list_pairs`); tied pairs, pairs of identical token
  sequences and lists left without a pair are counted in the returned Counter."""
  pairs, ties = list_pairs(ex.scores, rule)
  dropped, out = collections.Counter(), []
  if ties:
    dropped["tied_pair"] += ties
  for i, j in pairs:
    if not allow_identical and np.array_equal(ex.seqs[i].tokens, ex.seqs[j].tokens):
      dropped["identical_pair"] += 1
      continue
    refs = None if ex.ref_logps is None else np.asarray(ex.ref_logps, np.float32)[[i, j]]
    out.append(PreferenceExample((ex.seqs[i], ex.seqs[j]), None, None, refs))
  if not out:
    dropped["list_without_pair"] += 1
  return out, dropped


def _mismatched(own: Example, other: Example, seq_len: int) -> Example:
  """`own`'s bos + prompt followed by `other`'s response, cut from the right to `seq_len`."""
  start_own, start_other = int(np.argmax(own.weights > 0)), int(np.argmax(other.weights > 0))
  tokens = np.concatenate([own.tokens[:start_own], other.tokens[start_other:]])[:seq_len]
  weights = np.concatenate([own.weights[:start_own], other.weights[start_other:]])[:seq_len]
  return Example(tokens, weights)


def num_sequences(kind: str, list_size: int = 4, unpaired_kl: bool = True) -> int:
  """K: sequences per example."""
  return {"pairwise": 2, "unpaired": 2 if unpaired_kl else 1, "listwise": list_size}[kind]


def example_sequences(examples: Sequence[PreferenceExample], kind: str, *, seq_len: int, list_size: int = 4,
                      unpaired_kl: bool = True) -> list[list[Example]]:
  """The sequences of each example in batch order (unpaired: + the mismatched KL sequence)."""
  k = num_sequences(kind, list_size, unpaired_kl)
  out = []
  for i, ex in enumerate(examples):
    seqs = list(ex.seqs)
    if kind == "unpaired" and unpaired_kl:
      seqs.append(_mismatched(ex.seqs[0], examples[i - 1].seqs[0], seq_len))
    if len(seqs) > k:
      raise ValueError(f"example {i} has {len(seqs)} sequences > K = {k}")
    out.append(seqs)
  return out


def layout(examples: Sequence[PreferenceExample], kind: str, *, seq_len: int, list_size: int = 4,
           unpaired_kl: bool = True, pad_id: int = 0, packing: str = "none", pack_groups: int = 1,
           pack_rows: int | None = None, pack_len: int | None = None) -> dict[str, np.ndarray]:
  """The [B, K, T] batch of `examples` (the module docstring lists the fields); with `packing` "packed" or
  "shared_prompt" the rows of `data._pref_packing` instead ([G, rows, T] and `seq_index` [B, K, T])."""
  k = num_sequences(kind, list_size, unpaired_kl)
  b = len(examples)
  seqs_of = example_sequences(examples, kind, seq_len=seq_len, list_size=list_size, unpaired_kl=unpaired_kl)
  if _pref_packing.check_mode(packing) == "none":
    parts = []
    for i, seqs in enumerate(seqs_of):
      part, used = _packing.pack(seqs, k, seq_len, mode="none", pad_id=pad_id)
      if used != len(seqs):
        raise ValueError(f"example {i} has a sequence longer than seq_len {seq_len}")
      parts.append(part)
    batch = {f: np.stack([p[f] for p in parts]) for f in _packing.FIELDS}
  else:
    for i, seqs in enumerate(seqs_of):
      if max(len(s.tokens) for s in seqs) > seq_len:
        raise ValueError(f"example {i} has a sequence longer than seq_len {seq_len}")
    batch = _pref_packing.pack_batch(seqs_of, k, packing, groups=pack_groups, rows=pack_rows or 1,
                                     seq_len=seq_len, pad_id=pad_id, row_len=pack_len)
  if kind == "listwise":
    batch["scores"] = np.zeros((b, k), np.float32)
    batch["list_mask"] = np.zeros((b, k), np.float32)
    for i, ex in enumerate(examples):
      batch["scores"][i, :len(ex.seqs)] = ex.scores
      batch["list_mask"][i, :len(ex.seqs)] = 1.0
  if kind == "unpaired":
    batch["label"] = np.asarray([bool(ex.label) for ex in examples], bool)
  with_ref = [ex.ref_logps is not None for ex in examples]
  if any(with_ref):
    if not all(with_ref):
      raise ValueError("some examples carry ref_logps and some do not")
    batch["ref_logps"] = np.zeros((b, k), np.float32)
    for i, ex in enumerate(examples):
      batch["ref_logps"][i, :len(ex.ref_logps)] = ex.ref_logps
  with_emb = [ex.embeddings is not None for ex in examples]
  if any(with_emb):
    if not all(with_emb) or len({ex.embeddings.shape for ex in examples}) != 1:
      raise ValueError("precomputed embeddings must come with every example, of one dimension")
    stacked = np.stack([ex.embeddings for ex in examples])          # [B, 3, D]
    batch.update(e_x=stacked[:, 0], e_c=stacked[:, 1], e_r=stacked[:, 2])
  batch["example_mask"] = np.ones(b, np.float32)
  return batch


# ------------------------------------------------------------------------------------------------
# Dataset.
# ------------------------------------------------------------------------------------------------

class PreferenceDataset(SFTDataset):
  """Preference examples and how to batch them: `SFTDataset`'s stream (order per epoch, `iter`,
  resumable state) with `make_batch` laying out one example per row."""

  def __init__(self, examples: Sequence[PreferenceExample], *, kind: str, batch_size: int, seq_len: int,
               seed: int = 0, train: bool = True, list_size: int = 4, unpaired_kl: bool = True,
               pad_id: int = 0, process_index: int = 0, process_count: int = 1,
               report: SkipReport | None = None, pref_packing: str = "none", pack_groups: int = 1,
               pack_rows: int | None = None, pack_len: int | None = None):
    # Not SFTDataset.__init__: its checks are about packed token lists; the stream reads what is set here.
    if kind not in KINDS:
      raise ValueError(f"unknown preference kind {kind!r}; valid: {', '.join(KINDS)}")
    if not examples:
      raise ValueError("the dataset has no examples" + (f" ({report.summary()})" if report else ""))
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    if kind == "unpaired" and unpaired_kl and batch_size < 2:
      raise ValueError("unpaired_kl pairs each prompt with another example's completion: batch_size must "
                       "be >= 2 (or set unpaired_kl=False)")
    longest = max(len(s.tokens) for e in examples for s in e.seqs)
    if longest > seq_len:
      raise ValueError(f"a sequence has {longest} tokens > seq_len {seq_len}")
    self.k = num_sequences(kind, list_size, unpaired_kl)
    widest = max(len(e.seqs) for e in examples)
    if widest > self.k:
      raise ValueError(f"an example has {widest} sequences > K = {self.k}")
    self.examples = list(examples)
    self.kind, self.list_size, self.unpaired_kl = kind, list_size, unpaired_kl
    self.batch_size, self.seq_len, self.seed, self.train = batch_size, seq_len, seed, train
    self.packing, self.pad_id = "none", pad_id
    self.process_index, self.process_count = process_index, process_count
    self.report = report if report is not None else PreferenceReport()
    self._orders: dict[int, np.ndarray] = {}
    # Padding-free rows (`data._pref_packing`) for training; evaluation batches stay padded.
    self.pref_packing = _pref_packing.check_mode(pref_packing) if train else "none"
    self.pack_groups, self.pack_rows, self.pack_len = int(pack_groups), pack_rows, pack_len
    if self.pref_packing != "none":
      self._check_packing()

  def _check_packing(self) -> None:
    g, mode, T, L = self.pack_groups, self.pref_packing, self.seq_len, self.pack_len or self.seq_len
    if L < T:
      raise ValueError(f"config.data.pref_pack_len={L} must be >= seq_len {T} (a sequence fits one row)")
    if g < 1 or self.batch_size % g or g % self.process_count:
      raise ValueError(f"config.data.pref_pack_groups={g} must divide batch_size {self.batch_size} and be a "
                       f"multiple of process_count {self.process_count}")
    if self.pack_rows is not None and int(self.pack_rows) < 1:
      raise ValueError(f"config.data.pref_pack_rows={self.pack_rows} must be >= 1 (or None: automatic)")
    if self.pack_rows is None:   # the most rows a group of the first epoch's batches needs
      need, per = 1, self.batch_size // g
      for start in range(0, len(self.examples), self.batch_size):
        stream = _pipeline._Stream(self, 0, start)   # pylint: disable=protected-access
        rows = [stream[j] for j in range(self.batch_size)]
        seqs_of = example_sequences(rows, self.kind, seq_len=T, list_size=self.list_size,
                                    unpaired_kl=self.unpaired_kl)
        need = max([need] + [_pref_packing.rows_needed(seqs_of[q * per:(q + 1) * per], mode, L)
                             for q in range(g)])
      self.pack_rows = need

  def local_rows(self, batch: dict) -> dict:
    """This process's part of a global batch: its examples, and with packing its groups."""
    if self.pref_packing == "none":
      return super().local_rows(batch)
    out = {}
    for k, v in batch.items():
      n = self.pack_groups if k in _pref_packing.GROUP_FIELDS else self.batch_size
      rows = n // self.process_count
      out[k] = v[self.process_index * rows:(self.process_index + 1) * rows]
    return out

  def make_batch(self, stream) -> tuple[dict[str, np.ndarray], int]:
    rows = []
    for j in range(self.batch_size):
      try:
        rows.append(stream[j])
      except IndexError:   # the end of an eval pass
        break
    used = len(rows)
    rows += [self.examples[j % len(self.examples)] for j in range(self.batch_size - used)]
    batch = layout(rows, self.kind, seq_len=self.seq_len, list_size=self.list_size,
                   unpaired_kl=self.unpaired_kl, pad_id=self.pad_id, packing=self.pref_packing,
                   pack_groups=self.pack_groups, pack_rows=self.pack_rows, pack_len=self.pack_len)
    batch["example_mask"][used:] = 0.0
    return batch, used

  @property
  def num_tokens(self) -> int:
    return int(sum(len(s.tokens) for e in self.examples for s in e.seqs))


# ------------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------------

def preference_config(config):
  """The resolved data config of a preference dataset; incompatible options raise here, before any work."""
  cfg = _config.resolve(config)
  if not cfg.pref_kind:
    raise ValueError(f"config.pref_kind is not set; valid: {', '.join(KINDS)}")
  if cfg.messages_field:
    raise ValueError("messages_field is an SFT option: a preference record in chat form holds its "
                     "prompt messages in prompt_field and each response as one assistant message")
  if cfg.pref_kind == "listwise" and cfg.list_size < 2:
    raise ValueError(f"list_size must be >= 2 for listwise data, got {cfg.list_size}")
  _pref_packing.check_mode(cfg.pref_packing)
  if cfg.list_to_pairs is not None:
    if cfg.list_to_pairs not in LIST_TO_PAIRS:
      raise ValueError(f"list_to_pairs={cfg.list_to_pairs!r}; valid: None, {', '.join(LIST_TO_PAIRS)}")
    if cfg.pref_kind != "listwise":
      raise ValueError(f"list_to_pairs turns listwise records into pairs; pref_kind is {cfg.pref_kind!r}")
  if cfg.get("embeddings_field"):
    if cfg.pref_kind != "pairwise":
      raise ValueError(f"embeddings_field holds (prompt, chosen, rejected) embeddings of pairwise records; "
                       f"pref_kind is {cfg.pref_kind!r}")
    if len(cfg.embeddings_field.split(",")) != 3:
      raise ValueError(f"embeddings_field {cfg.embeddings_field!r} must name 3 fields: prompt, chosen, rejected")
  if cfg.ref_logps_field:
    names = len(cfg.ref_logps_field.split(","))
    if cfg.pref_kind == "unpaired" and cfg.unpaired_kl:
      raise ValueError("ref_logps_field with pref_kind='unpaired' needs unpaired_kl=False: the mismatched "
                       "KL pairs are made per batch, so no record can carry their reference log-probs")
    if names > 1 and names != num_sequences(cfg.pref_kind, cfg.list_size, False):
      raise ValueError(f"ref_logps_field {cfg.ref_logps_field!r} names {names} fields; a {cfg.pref_kind} "
                       f"record has {num_sequences(cfg.pref_kind, cfg.list_size, False)} sequences "
                       f"(or name one field holding a list)")
  return cfg


def _renderer(cfg, tokenizer=None) -> Render:
  """Chat rendering with the config's (or the tokenizer's) template, set up at the first chat record."""
  return _config.ChatTemplate(cfg, tokenizer).render_split


def record_reader(cfg, source, tokenizer=None) -> Callable[[Any], tuple[PreferenceRecord, collections.Counter]]:
  """record -> (PreferenceRecord, dropped list entries) for the source's format (`data._formats`)."""
  fmt = _config.record_format(cfg, source)
  chat = _config.ChatTemplate(cfg, tokenizer)
  fields = (Fields.from_config(cfg) if fmt == "fields" else
            Fields(ref_logps=cfg.ref_logps_field, embeddings=cfg.get("embeddings_field")))

  def read(record):
    if fmt != "fields":
      record = _formats.preference_record(record, fmt, cfg, chat=fmt in ("hh_rlhf", "ultrafeedback")
                                          and chat.available)
    return record_preference(record, cfg.pref_kind, fields, render=chat.render_split, list_size=cfg.list_size,
                             allow_identical=cfg.allow_identical)
  return read


def get_preference_dataset(config, split: str, *, tokenizer, batch_size: int, seq_len: int, seed: int = 0,
                           train: bool | None = None, process_index: int = 0,
                           process_count: int = 1, packed: bool = False) -> PreferenceDataset:
  """[B, K, T] preference batches of a split: endless and shuffled when `train` (default: split
  "train..."), else one pass in order. Every record is read, checked and tokenized here, once.

  `packed`: lay training batches out per `config.pref_packing` (the trainer's training stream); other
  readers of the split (calibration, selection statistics, evaluation) keep the padded rows."""
  cfg = preference_config(config)
  train = split.startswith("train") if train is None else train
  source = _config.make_source(cfg, split)
  read, dropped = record_reader(cfg, source, tokenizer), collections.Counter()

  def encode(record):
    rec, d1 = read(record)
    ex, d2 = encode_preference(rec, tokenizer, cfg.pref_kind, seq_len=seq_len,
                               max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                               truncate=cfg.truncate, allow_identical=cfg.allow_identical)
    dropped.update(d1 + d2)   # only for records that are kept
    return ex

  indices = _config.indices(cfg, source, split)
  examples, report = _sft.build_examples(source, indices, encode, skip_invalid=cfg.skip_invalid)
  kind = cfg.pref_kind
  if kind == "listwise" and cfg.list_to_pairs:   # pairs from the scores, for a pairwise loss
    pairs, kept = [], []
    for ex, src in zip(examples, report.kept):
      got, d = to_pairs(ex, cfg.list_to_pairs, cfg.allow_identical)
      pairs += got
      kept += [src] * len(got)
      dropped.update(d)
    examples, kind, report.kept = pairs, "pairwise", kept
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return PreferenceDataset(examples, kind=kind, batch_size=batch_size, seq_len=seq_len, seed=seed,
                           train=train, list_size=cfg.list_size, unpaired_kl=cfg.unpaired_kl, pad_id=pad_id,
                           process_index=process_index, process_count=process_count,
                           report=PreferenceReport(report, dropped),
                           pref_packing=cfg.pref_packing if packed else "none",
                           pack_groups=cfg.pref_pack_groups, pack_rows=cfg.pref_pack_rows,
                           pack_len=cfg.pref_pack_len)


def preference_eval_examples(config, split: str, n: int | None = None) -> list[PreferenceRecord]:
  """The first `n` valid records of a split as text, to measure held-out preference accuracy.

  Record rules apply (invalid records raise, or are skipped with `skip_invalid`); the token rules
  (truncation to seq_len) apply when the records are laid out by `preference_batch`.
  """
  cfg = preference_config(config)
  if cfg.source == "builtin" and n is not None:
    with cfg.unlocked():
      cfg.eval_size = n   # generation is prefix-stable: the first n of any larger eval set
  source = _config.make_source(cfg, split)
  read = record_reader(cfg, source)
  records, _ = _sft.build_examples(source, _config.indices(cfg, source, split)[:n], lambda r: read(r)[0],
                                   skip_invalid=cfg.skip_invalid)
  return records


def preference_batch(records: Sequence[PreferenceRecord], config, *, tokenizer,
                     seq_len: int) -> dict[str, np.ndarray]:
  """The [B, K, T] batch of `records` (from `preference_eval_examples`); a record the token rules
  reject raises a `DataError` naming its index."""
  cfg = preference_config(config)
  examples = []
  for i, rec in enumerate(records):
    try:
      examples.append(encode_preference(rec, tokenizer, cfg.pref_kind, seq_len=seq_len,
                                        max_prompt_len=cfg.max_prompt_len,
                                        max_response_len=cfg.max_response_len, truncate=cfg.truncate,
                                        allow_identical=cfg.allow_identical)[0])
    except DataError as e:
      raise e.at("<records>", i + 1) from None
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return layout(examples, cfg.pref_kind, seq_len=seq_len, list_size=cfg.list_size,
                unpaired_kl=cfg.unpaired_kl, pad_id=pad_id)


def best_response(rec: PreferenceRecord) -> str | None:
  """The response a model should generate: chosen, the desirable completion, or the top-scored entry
  (for a chat record its message content, not the rendered turn with its end-of-turn token)."""
  answers = rec.answers if rec.answers is not None else rec.responses
  if rec.scores is not None:
    return answers[int(np.argmax(rec.scores))]
  if rec.label is False:
    return None
  return answers[0]
