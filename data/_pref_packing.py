r"""Padding-free preference batches: the K sequences of each example packed into shared rows.

    cfg.pref_packing = "packed"          # "none" (default): one padded row per sequence (`data._preference`)
    cfg.pref_packing = "shared_prompt"   # the prompt once per example, each completion attending to it

The padded layout gives every sequence a row of T slots ([B, K, T]); with short or long-tailed lengths
most slots are padding. Here the B examples of a batch are split into `pref_pack_groups` groups of
consecutive examples, and each group is packed by first-fit decreasing into `rows` rows of L slots
(`pref_pack_len`, default L = T = seq_len):

    inputs, targets, loss_mask, positions, segment_ids   [G, rows, L]   as SFT rows (`data._packing`)
    prefix_ids    [G, rows, L] int32   shared_prompt: the segment id of the prompt a completion token also
                                       attends to (0 elsewhere); `models.Decoder.apply(prefix_ids=...)`
    seq_index     [B, K, T]    int32   slot of token t of sequence (b, k) in its group's rows flattened
                                       (row * L + slot); -1 past the sequence's end and for list padding
    scores, list_mask, label, ref_logps, e_x, e_c, e_r, example_mask   [B, ...] as in the padded batch

`losses.model_outputs` runs the model over the rows and gathers every per-token quantity back through
`seq_index` into the [B, K, T] view of the padded batch, so the losses see the same dict either way.
Groups are independent, so a batch splits along its leading axes into micro-batches (gradient
accumulation), processes and data-parallel shards, as long as `pref_pack_groups` is a multiple of each.

**Shared prompt.** The sequences of an example share `bos + prompt` up to their first response token
(TRL tokenizes prompt + response whole, so a boundary token may differ: the shared part is the common
prefix of the K token sequences). The last prompt token is not shared: its target is each completion's
first token. So the prompt segment holds tokens [0, P) at positions 0..P-1, and completion k holds its
tokens [P, n_k) at positions P..n_k-1 with `prefix_ids` = the prompt's segment: under the mask
"causal and (same segment or key segment = own prefix id)" each completion token sees exactly the
tokens the padded row shows it, at the same RoPE positions, hence the same logits. An example whose
prompt and completions exceed a row (L) is packed as separate sequences, as "packed" does.

Worked example (bos 1, eos 2, "a" 13, "x" 36, "y" 37; prompt "a", chosen "xy", rejected "y"; T = 8):
padded [[1 13 36 37 2], [1 13 37 2]]; shared prompt P = 1 (bos; "a" stays with each completion):

    inputs       [1 | 13 36 37  2 | 13 37  2]
    positions    [0 |  1  2  3  4 |  1  2  3]
    segment_ids  [1 |  2  2  2  2 |  3  3  3]
    prefix_ids   [0 |  1  1  1  1 |  1  1  1]
    loss_mask    [0 |  1  1  1  0 |  1  1  0]
    seq_index    chosen [0 1 2 3 4 -1 -1 -1], rejected [0 5 6 7 -1 -1 -1 -1]

**Rows per group** (`pref_pack_rows`): shapes must be static under jit, so every batch has the same
number of rows. None: the most rows any group of the first epoch needs (computed once, from the lengths
only). A batch that needs more gets the next multiple of that number: a new shape, one more
compilation, never a failure. Evaluation batches stay padded (`train=False`).

The batch holds the same B examples of the stream as the padded one, so the iterator state and exact
resume are the padded stream's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data import _packing

MODES = ("none", "packed", "shared_prompt")
GROUP_FIELDS = _packing.FIELDS + ("prefix_ids",)     # [G, rows, L]: split by group, not by example


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"config.data.pref_packing={mode!r}; valid: {', '.join(MODES)}")
  return mode


def shared_length(seqs: Sequence) -> int:
  """P: the tokens all `seqs` share before the last prompt token of the shortest prompt (0: none)."""
  starts = [int(np.argmax(np.asarray(s.weights) > 0)) for s in seqs]
  limit = min(starts) - 1    # the last prompt token predicts a response token: it stays with each completion
  if limit <= 0:
    return 0
  first = np.asarray(seqs[0].tokens[:limit])
  p = limit
  for s in seqs[1:]:
    same = np.asarray(s.tokens[:limit]) == first
    p = min(p, int(np.argmin(same)) if not same.all() else limit)
  return p


def _items(seqs: Sequence, mode: str, row_len: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
  """Packing items of one example: (slots, [(sequence index k, token start, token end)]); the first part
  of a shared-prompt item with k = -1 is the prompt. A shared-prompt example longer than a row is packed
  as separate sequences (exact too, only without the saving)."""
  separate = [(len(s.tokens), [(k, 0, len(s.tokens))]) for k, s in enumerate(seqs)]
  if mode == "packed":
    return separate
  p = shared_length(seqs) if len(seqs) > 1 else 0
  parts = ([(-1, 0, p)] if p else []) + [(k, p, len(s.tokens)) for k, s in enumerate(seqs)]
  n = sum(e - b for _, b, e in parts)
  return [(n, parts)] if n <= row_len else separate


def item_sizes(seqs: Sequence, mode: str, row_len: int) -> list[int]:
  return [n for n, _ in _items(seqs, mode, row_len)]


def _first_fit(sizes: Sequence[int], row_len: int) -> tuple[list[int], int]:
  """First-fit decreasing: (row of each item, rows used)."""
  fill: list[int] = []
  where = [0] * len(sizes)
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):   # stable: ties keep stream order
    for r, f in enumerate(fill):
      if f + sizes[i] <= row_len:
        break
    else:
      r = len(fill)
      fill.append(0)
    where[i] = r
    fill[r] += sizes[i]
  return where, len(fill)


def rows_needed(seqs_per_example: Sequence[Sequence], mode: str, row_len: int) -> int:
  """Rows of `row_len` slots first-fit decreasing needs for one group (from the lengths only)."""
  sizes = [n for seqs in seqs_per_example for n in item_sizes(seqs, mode, row_len)]
  return _first_fit(sizes, row_len)[1]


def pack_group(seqs_per_example: Sequence[Sequence], k: int, mode: str, rows: int, seq_len: int,
               pad_id: int = 0, row_len: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(rows [rows, L] fields with prefix_ids, seq_index [n, k, seq_len]) of one group of examples; L = row_len
  (default seq_len)."""
  L = row_len or seq_len
  items = [(e, it) for e, seqs in enumerate(seqs_per_example) for it in _items(seqs, mode, L)]
  where, used = _first_fit([n for _, (n, _) in items], L)
  if used > rows:
    raise ValueError(f"a group needs {used} rows > {rows} (config.data.pref_pack_rows)")
  out = _packing.empty_batch(rows, L, pad_id)
  out["prefix_ids"] = np.zeros((rows, L), np.int32)
  index = np.full((len(seqs_per_example), k, seq_len), -1, np.int32)
  fill, segs = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
  for i in sorted(range(len(items)), key=lambda i: (where[i], -items[i][1][0])):   # row by row, FFD order
    e, (n, parts) = items[i]
    r = where[i]
    prompt_seg = 0
    for kk, b, end in parts:
      seq = seqs_per_example[e][max(kk, 0)]
      tokens, weights = np.asarray(seq.tokens[b:end]), np.asarray(seq.weights[b:end])
      s, m = int(fill[r]), end - b
      segs[r] += 1
      out["inputs"][r, s:s + m] = tokens
      out["targets"][r, s:s + m - 1] = tokens[1:]
      out["loss_mask"][r, s:s + m - 1] = weights[1:]
      out["positions"][r, s:s + m] = np.arange(b, end, dtype=np.int32)
      out["segment_ids"][r, s:s + m] = segs[r]
      slots = r * L + s + np.arange(m, dtype=np.int32)
      if kk < 0:   # the shared prompt: every completion of the example reads its slots
        prompt_seg = int(segs[r])
        index[e, :len(seqs_per_example[e]), :m] = slots
      else:
        out["prefix_ids"][r, s:s + m] = prompt_seg
        index[e, kk, b:end] = slots
      fill[r] += m
  return out, index


def pack_batch(seqs_per_example: Sequence[Sequence], k: int, mode: str, *, groups: int, rows: int,
               seq_len: int, pad_id: int = 0, row_len: int | None = None) -> dict[str, np.ndarray]:
  """The [G, rows', L] fields and seq_index [B, K, T] of a batch; rows' = rows, or the next multiple of
  it when a group needs more (see the module docstring)."""
  b = len(seqs_per_example)
  if b % groups:
    raise ValueError(f"batch_size {b} is not divisible by config.data.pref_pack_groups={groups}")
  per = b // groups
  chunks = [seqs_per_example[g * per:(g + 1) * per] for g in range(groups)]
  need = max(rows_needed(c, mode, row_len or seq_len) for c in chunks)
  rows = rows * -(-need // rows)
  parts = [pack_group(c, k, mode, rows, seq_len, pad_id, row_len) for c in chunks]
  batch = {f: np.stack([p[0][f] for p in parts]) for f in GROUP_FIELDS}
  if mode != "shared_prompt":
    del batch["prefix_ids"]
  batch["seq_index"] = np.concatenate([p[1] for p in parts])
  return batch
