"""Deterministic, resumable batches over precomputed examples.

Training reads an endless stream: epoch e visits the examples in the order

    order_e = permutation(N, rng=(seed, e))

and the stream is order_0, order_1, ... back to back, so a batch may straddle two epochs and no example
is dropped at an epoch's end. Each batch packs the next examples of the stream into `batch_size` rows
(`data._packing`), which consumes a prefix of it; the iterator's whole state is therefore

    {"epoch": e, "position": p}          the next example is order_e[p]

(plus `num_examples` and `seed`, checked on restore so a changed dataset is not resumed silently). A run
restored from that state yields exactly the batches of the uninterrupted run. Evaluation reads the
examples once, in order, and pads the last batch with empty rows (segment 0) to keep shapes static.

We do the index arithmetic ourselves rather than with grain: for datasets that fit in memory (SFT sets,
tokenized once) it is a few lines, and packing needs the exact stream position, which a sampler over
rows does not give. Rows are packed per batch, so documents meet different neighbours every epoch.

With several processes each one packs the same global batch (cheap and deterministic) and keeps its
`batch_size / process_count` rows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data import _packing
from data._sft import Example, SkipReport


class _Stream:
  """The examples from a stream position on, indexed from 0 (a `Sequence` for `pack`)."""

  def __init__(self, ds: "SFTDataset", epoch: int, position: int):
    self.ds, self.epoch, self.position = ds, epoch, position

  def __getitem__(self, j: int) -> Example:
    q = self.position + j
    n = len(self.ds.examples)
    if not self.ds.train and q >= n:
      raise IndexError(j)
    epoch, k = self.epoch + q // n, q % n
    return self.ds.examples[self.ds.order(epoch)[k]]


class BatchIterator:
  """`next(it)` -> batch dict; `it.get_state()` / `it.set_state(state)` for checkpoints."""

  def __init__(self, ds: "SFTDataset"):
    self.ds = ds
    self.epoch, self.position = 0, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    ds = self.ds
    if not ds.train and self.position >= len(ds.examples):
      raise StopIteration
    batch, used = ds.make_batch(_Stream(ds, self.epoch, self.position))
    if ds.train:
      q = self.position + used
      self.epoch, self.position = self.epoch + q // len(ds.examples), q % len(ds.examples)
    else:
      self.position += used
    return ds.local_rows(batch)

  def get_state(self) -> dict:
    """JSON-serialisable position in the stream."""
    return {"epoch": self.epoch, "position": self.position,
            "num_examples": len(self.ds.examples), "seed": self.ds.seed}

  def set_state(self, state: dict) -> None:
    want = {"num_examples": len(self.ds.examples), "seed": self.ds.seed}
    got = {k: state.get(k) for k in want}
    if got != want:
      raise ValueError(f"iterator state {state} is for another dataset (this one: {want})")
    if not 0 <= int(state["position"]) <= len(self.ds.examples) or int(state["epoch"]) < 0:
      raise ValueError(f"iterator state {state} is out of range")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SFTDataset:
  """Tokenized examples and how to batch them. `iter(ds)` starts at the beginning of the stream."""

  def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, seed: int = 0,
               train: bool = True, packing: str = "first_fit", pad_id: int = 0,
               process_index: int = 0, process_count: int = 1, report: SkipReport | None = None):
    if not examples:
      raise ValueError("the dataset has no examples" + (f" ({report.summary()})" if report else ""))
    if packing not in _packing.MODES:
      raise ValueError(f"unknown packing mode {packing!r}; valid: {', '.join(_packing.MODES)}")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    sizes = {len(e.aligned_logps) if hasattr(e, "aligned_logps") else None for e in examples}
    if len(sizes) > 1:
      raise ValueError(f"examples carry aligned log-probs of different numbers of models {sorted(sizes, key=str)}")
    self.num_aligned = sizes.pop()
    if self.num_aligned is not None and packing != "none":
      raise ValueError(f"aligned log-probs are per example (one row each): they need packing='none', got "
                       f"{packing!r}")
    longest = max(len(e.tokens) for e in examples)
    if longest > seq_len:
      raise ValueError(f"an example has {longest} tokens > seq_len {seq_len}")
    self.examples = examples
    self.batch_size, self.seq_len, self.seed, self.train = batch_size, seq_len, seed, train
    self.packing, self.pad_id = packing, pad_id
    self.process_index, self.process_count = process_index, process_count
    self.report = report if report is not None else SkipReport()
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """The example order of an epoch: a seeded permutation for training, the file order for eval."""
    if epoch not in self._orders:
      n = len(self.examples)
      if self.train:
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
      else:
        order = np.arange(n)
      if len(self._orders) > 2:   # a stream only ever looks at two consecutive epochs
        self._orders.pop(min(self._orders))
      self._orders[epoch] = order
    return self._orders[epoch]

  def make_batch(self, stream: Sequence[Example]) -> tuple[dict[str, np.ndarray], int]:
    """The global batch made from a prefix of `stream`, and the length of that prefix.

    The hook a dataset with another batch layout overrides (`data._preference`); the stream, its state
    and the process slicing stay in `BatchIterator`.
    """
    batch, used = _packing.pack(stream, self.batch_size, self.seq_len, mode=self.packing, pad_id=self.pad_id)
    if self.num_aligned is not None:   # packing "none": example j of the stream is row j
      batch["aligned_logps"] = np.zeros((self.batch_size, 1, self.num_aligned), np.float32)
      for j in range(used):
        batch["aligned_logps"][j, 0] = stream[j].aligned_logps
    return batch, used

  def local_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's `batch_size / process_count` rows of a global batch."""
    rows = self.batch_size // self.process_count
    lo = self.process_index * rows
    return {k: v[lo:lo + rows] for k, v in batch.items()}

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self)

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def num_tokens(self) -> int:
    return int(sum(len(e.tokens) for e in self.examples))
