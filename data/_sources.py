"""Record sources: random-access sequences of dict records (`len(src)`, `src[i]`, `src.where(i)`).

    JsonlSource(path)                     one JSON object per line (blank lines ignored)
    ParquetSource(path)                   one row per record
    files(JsonlSource, "d/train-*.jsonl") the files a glob matches, in name order, as one source
    TfdsSource(name, split, data_dir)     `tfds.data_source`: array_record files, no TensorFlow needed
    ArrayRecordSource(paths)              array_record files whose records are UTF-8 JSON objects
    HFSource(name, split, ...)            HF `datasets`: a hub name, a local dataset directory, a directory
                                          written by `save_to_disk`, or a builder ("json", "parquet") over
                                          local `data_files`
    ListSource(records, name)             records already in memory (built-in synthetic tasks)

`where(i)` is `(file, line)` with a 1-based line (or row / record number), which every error about
record `i` names. Sources decode bytes to `str` (TFDS stores text as bytes) but do not check fields:
that is the example builder's job (`data._sft`), so one place knows the rules and the skip counters.

`write_jsonl` and `write_array_record` let an import land in either format; `data._tfds` holds a TFDS
builder for the synthetic tasks.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np


class DataError(ValueError):
  """A malformed record: `file`, 1-based `line`, a short `reason` (a skip-counter key) and details."""

  def __init__(self, reason: str, detail: str = "", file: str | None = None, line: int | None = None):
    self.reason, self.detail, self.file, self.line = reason, detail, file, line
    super().__init__(self._message())

  def _message(self) -> str:
    where = "" if self.file is None else f"{self.file}, line {self.line}: " if self.line else f"{self.file}: "
    return f"{where}{self.reason}" + (f": {self.detail}" if self.detail else "")

  def at(self, file: str, line: int) -> "DataError":
    """The same error, located."""
    return DataError(self.reason, self.detail, file, line)


def _to_python(x: Any) -> Any:
  """bytes -> str and numpy -> lists, recursively (TFDS yields bytes and arrays)."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [_to_python(v) for v in x.tolist()] if x.ndim else _to_python(x.item())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, dict):
    return {k: _to_python(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_python(v) for v in x]
  return x


class ListSource:
  """Records already in memory."""

  def __init__(self, records: Sequence[dict], name: str = "<memory>"):
    self.records, self.name = records, name

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]

  def where(self, i: int) -> tuple[str, int]:
    return self.name, i + 1


class JsonlSource:
  """A JSON-lines file. Lines are read once; a line is parsed when its record is asked for."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark (written by some editors) is not data
      raw = raw[3:]
    # (1-based line number, bytes) of every non-blank line: a trailing newline is not a record. Lines are
    # decoded when read, so a bad byte is a `bad_encoding` error naming the file and line.
    self._lines = [(n, s) for n, s in enumerate(raw.split(b"\n"), 1) if s.strip()]

  def __len__(self):
    return len(self._lines)

  def __getitem__(self, i: int) -> dict:
    n, s = self._lines[i]
    try:
      s = s.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError("bad_encoding", f"not UTF-8: byte {s[e.start:e.start + 1]!r} at column {e.start + 1}",
                      self.path, n) from None
    try:
      record = json.loads(s)
    except json.JSONDecodeError as e:
      raise DataError("bad_json", str(e), self.path, n) from None
    if not isinstance(record, dict):
      raise DataError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}",
                      self.path, n)
    return record

  def where(self, i: int) -> tuple[str, int]:
    return self.path, self._lines[i][0]


class ParquetSource:
  """A Parquet file, read whole (SFT sets are small); rows are numbered from 1."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = os.fspath(path)
    self._rows = pq.read_table(self.path).to_pylist()

  def __len__(self):
    return len(self._rows)

  def __getitem__(self, i: int) -> dict:
    return self._rows[i]

  def where(self, i: int) -> tuple[str, int]:
    return self.path, i + 1


class TfdsSource:
  """`tfds.data_source(name, split, data_dir)`: random access into array_record files, no TensorFlow."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    self._src = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    return _to_python(self._src[i])

  def where(self, i: int) -> tuple[str, int]:
    return f"tfds:{self.name}/{self.split}", i + 1


def expand(paths: str | Sequence[str]) -> list[str]:
  """The files a path, a glob or a list of them names, each glob's matches in name order."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  out = []
  for p in map(os.fspath, paths):
    hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
    if not hits:
      raise FileNotFoundError(f"no file matches {p!r}")
    out += hits
  return out


_expand = expand


class ConcatSource:
  """Several sources back to back; `where` names the file a record comes from."""

  def __init__(self, sources: Sequence):
    self.sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self):
    return int(self._starts[-1])

  def _locate(self, i: int) -> tuple[Any, int]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = int(np.searchsorted(self._starts, i, side="right")) - 1
    return self.sources[k], i - int(self._starts[k])

  def __getitem__(self, i: int) -> dict:
    src, j = self._locate(int(i))
    return src[j]

  def where(self, i: int) -> tuple[str, int]:
    src, j = self._locate(int(i))
    return src.where(j)


def files(cls, pattern: str | Sequence[str]):
  """`cls(path)` for one file, else one source over every file the glob (or list) matches."""
  paths = expand(pattern)
  return cls(paths[0]) if len(paths) == 1 else ConcatSource([cls(p) for p in paths])


class ArrayRecordSource:
  """array_record files (a path, a glob or a list) whose records are UTF-8 JSON objects.

  TFDS-written array_record files hold serialized tf.Examples instead: read those with `TfdsSource`,
  which knows their features.
  """

  def __init__(self, paths: str | Sequence[str]):
    import grain.python as grain  # pylint: disable=g-import-not-at-top
    self.paths = _expand(paths)
    self.name = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1})"
    self._src = grain.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    raw = self._src[i]
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError("bad_json", str(e), self.name, i + 1) from None
    if not isinstance(record, dict):
      raise DataError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}",
                      self.name, i + 1)
    return record

  def where(self, i: int) -> tuple[str, int]:
    return self.name, i + 1


class HFSource:
  """A split of an HF `datasets` dataset, only when `datasets` is installed.

  `name` is a hub name, a local dataset directory (data files `load_dataset` recognises), a directory
  written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`; a
  DatasetDict gives `split`), or a builder such as "json" / "parquet" with local `data_files`.
  """

  def __init__(self, name: str, split: str, *, config_name: str | None = None,
               data_dir: str | None = None, data_files: Sequence[str] | None = None):
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("source='hf' needs the HF `datasets` package, which is not installed; "
                        "export the data to JSONL or Parquet, or use source='tfds'") from None
    self.name, self.split = name, split
    saved = os.path.isdir(name) and any(os.path.exists(os.path.join(name, f))
                                        for f in ("dataset_dict.json", "state.json"))
    if saved:
      ds = datasets.load_from_disk(name)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise ValueError(f"{name} holds the splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
      self._ds = ds
    elif data_files is not None:
      self._ds = datasets.load_dataset(name, config_name, data_files={split: list(data_files)}, split=split)
      self.name = data_files[0] if len(data_files) == 1 else f"{data_files[0]} (+{len(data_files) - 1})"
    else:
      self._ds = datasets.load_dataset(name, config_name, split=split, data_dir=data_dir)

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, i: int) -> dict:
    return _to_python(self._ds[int(i)])

  def where(self, i: int) -> tuple[str, int]:
    if os.path.isfile(self.name):   # local data files: the file and its line
      return self.name, i + 1
    return f"hf:{self.name}/{self.split}", i + 1


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_array_record(path: str, records: Iterable[dict]) -> None:
  """One JSON object per record, readable by `ArrayRecordSource` (and by grain directly)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  # group_size:1 keeps each record its own chunk: random access reads one record, not a group.
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  try:
    for r in records:
      writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
  finally:
    writer.close()
