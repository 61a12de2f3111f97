"""Packing examples into rows of `seq_len` slots: the five arrays the trainer consumes.

    inputs       [R, T] int32    the tokens
    targets      [R, T] int32    the next token of the same document (0 at a document's last slot)
    loss_mask    [R, T] float32  1 where targets[t] is a token to learn; 0 across a document boundary
    positions    [R, T] int32    restart at 0 for each document
    segment_ids  [R, T] int32    1, 2, 3... per document in its row; 0 = padding

Targets are shifted inside each document, so the last slot of a document would predict the next
document's bos: that target is 0 and masked. Attention is kept inside a document by `segment_ids`, and
RoPE sees `positions`, so a packed document gives the same logits as the document alone.

Modes: "first_fit" puts each example, in stream order, into the first of the `R` rows with room and
closes the batch at the first example that fits in none; "greedy" fills rows one after the other (as
lm1b's `pack_dataset`); "none" puts one example per row (plain padding). All three consume a *prefix* of
the stream, so a position in the stream is the whole state of the packer.

Worked example (bos=1, eos=2; `weights` 1 on response and eos), `pack([A, B, C, D], rows=2, seq_len=8)`:

    A = [1 5 6 2]     weights [0 0 1 1]       (prompt 5, response 6)
    B = [1 7 8 9 2]   weights [0 0 1 1 1]     (prompt 7, response 8 9)
    C = [1 3 4 2]     weights [0 0 1 1]
    D = [1 3 3 3 2]   does not fit in either row after A, B, C: the batch closes, 3 examples used.

    first_fit        row 0 = A C              row 1 = B, padding
    inputs       [[1 5 6 2 1 3 4 2],     [1 7 8 9 2 0 0 0]]
    targets      [[5 6 2 0 3 4 2 0],     [7 8 9 2 0 0 0 0]]
    loss_mask    [[0 1 1 0 0 1 1 0],     [0 1 1 1 0 0 0 0]]
    positions    [[0 1 2 3 0 1 2 3],     [0 1 2 3 4 0 0 0]]
    segment_ids  [[1 1 1 1 2 2 2 2],     [1 1 1 1 1 0 0 0]]

With "greedy", B (5 slots) does not fit after A (4 + 5 > 8): row 0 = A, row 1 = B; C does not fit after
B and no row is left, so 2 examples are used and C opens the next batch. "none" gives the same rows here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("first_fit", "greedy", "none")
FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def empty_batch(rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  return {
      "inputs": np.full((rows, seq_len), pad_id, np.int32),
      "targets": np.zeros((rows, seq_len), np.int32),
      "loss_mask": np.zeros((rows, seq_len), np.float32),
      "positions": np.zeros((rows, seq_len), np.int32),
      "segment_ids": np.zeros((rows, seq_len), np.int32),
  }


def _put(batch, r: int, start: int, segment: int, tokens: np.ndarray, weights: np.ndarray) -> None:
  n = len(tokens)
  end = start + n
  batch["inputs"][r, start:end] = tokens
  batch["targets"][r, start:end - 1] = tokens[1:]
  batch["loss_mask"][r, start:end - 1] = weights[1:]
  batch["positions"][r, start:end] = np.arange(n, dtype=np.int32)
  batch["segment_ids"][r, start:end] = segment


def pack(examples: Sequence, rows: int, seq_len: int, *, mode: str = "first_fit",
         pad_id: int = 0) -> tuple[dict[str, np.ndarray], int]:
  """Packs a prefix of `examples` ((tokens, weights) pairs) into `rows` rows; returns (batch, used).

  `examples` is indexed 0, 1, 2... until an example does not fit or `IndexError` (end of data).
  """
  if mode not in MODES:
    raise ValueError(f"unknown packing mode {mode!r}; valid: {', '.join(MODES)}")
  batch = empty_batch(rows, seq_len, pad_id)
  fill = np.zeros(rows, np.int64)      # slots used per row
  segments = np.zeros(rows, np.int64)  # documents per row
  row, used = 0, 0                     # `row`: the open row of "greedy" / next row of "none"
  while True:
    try:
      tokens, weights = examples[used][:2]   # an Example may carry more fields; packing reads these two
    except IndexError:
      break
    n = len(tokens)
    if not 1 <= n <= seq_len:
      raise ValueError(f"example {used} has {n} tokens; a row holds 1 to {seq_len}")
    if mode == "first_fit":
      room = np.flatnonzero(fill + n <= seq_len)
      if not room.size:
        break
      r = int(room[0])
    else:
      while row < rows and fill[row] + n > seq_len:
        row += 1
      if row == rows:
        break
      r = row
      if mode == "none":
        row += 1
    segments[r] += 1
    _put(batch, r, int(fill[r]), int(segments[r]), np.asarray(tokens), np.asarray(weights))
    fill[r] += n
    used += 1
  return batch, used
