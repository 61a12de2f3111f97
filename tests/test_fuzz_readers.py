"""Property-based (hypothesis) fuzzing of every reader (issue 11 part 9): random and mutated records in
JSONL, Parquet and array_record files, read as SFT, pairwise, unpaired and listwise data. Each file
either loads or fails with a `DataError` naming the file and a line in it (or, when every record is
invalid, "the dataset has no examples" with the counts); with `skip_invalid=True` every record is either
an example or counted under a documented reason, so nothing is dropped silently."""
import json
import os
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import data  # noqa: E402

TOK = data.CharTokenizer()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

text = st.one_of(st.text(alphabet="0123456789 +=", max_size=12), st.text(max_size=6), st.just(""), st.just("  "))
value = st.one_of(text, st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.booleans(),
                  st.lists(text, max_size=5))
FIELDS = ("prompt", "response", "chosen", "rejected", "completion", "label", "responses", "scores", "ranks")


@st.composite
def record(draw, kind):
  """A record of `kind` that is mostly right, with fields dropped, retyped or corrupted at random."""
  r = {"prompt": draw(text)}
  if kind is None:
    r["response"] = draw(text)
  elif kind == "pairwise":
    r["chosen"], r["rejected"] = draw(text), draw(text)
  elif kind == "unpaired":
    r["completion"], r["label"] = draw(text), draw(st.one_of(st.booleans(), st.integers(-1, 2), st.none()))
  else:
    n = draw(st.integers(0, 6))
    r["responses"] = draw(st.lists(text, min_size=n, max_size=n))
    r["scores"] = draw(st.one_of(st.lists(st.one_of(st.floats(-5, 5), st.none(), st.just(float("nan"))),
                                          min_size=n, max_size=n + draw(st.integers(0, 1))), st.none()))
    if r["scores"] is None:
      r["ranks"] = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
  for _ in range(draw(st.integers(0, 2))):        # mutations
    field = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
      r.pop(field, None)
    else:
      r[field] = draw(value)
  return r


def lines_of(draw, kind):
  """JSONL lines: records, and now and then broken bytes, a torn line, a non-object or a BOM."""
  out = []
  for rec in draw(st.lists(record(kind), min_size=0, max_size=8)):
    line = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8")
    how = draw(st.sampled_from(["ok"] * 6 + ["torn", "bytes", "array", "blank"]))
    if how == "torn":
      line = line[:max(1, len(line) // 2)]
    elif how == "bytes":
      line = line[:3] + b"\xff\xfe" + line[3:]
    elif how == "array":
      line = b"[1, 2]"
    elif how == "blank":
      line = b"   "
    out.append(line)
  bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
  return bom + b"\n".join(out) + (b"\n" if draw(st.booleans()) else b"")


def _cfg(path, kind, source="jsonl", skip=False):
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.tokenizer, cfg.skip_invalid = source, path, "char", skip
  cfg.pref_kind, cfg.format = kind, "fields"
  return cfg


def _check(path, kind, n_records, source="jsonl"):
  reasons = set(data.PREF_REASONS if kind else data.REASONS)
  try:
    ds = data.get_dataset(_cfg(path, kind, source), "train", tokenizer=TOK, batch_size=2, seq_len=12)
  except data.DataError as e:
    assert e.reason in reasons, e
    assert e.file == path, e
    assert e.line is None and e.reason == "empty_file" or 1 <= e.line <= max(n_records, 1) + 1, e
  except ValueError as e:
    assert "the dataset has no examples" in str(e), e
  else:
    assert 1 <= len(ds.examples) <= max(n_records, 1) * (1 if kind != "listwise" else 1)
    next(iter(ds))
  try:
    ds = data.get_dataset(_cfg(path, kind, source, skip=True), "train", tokenizer=TOK, batch_size=2, seq_len=12)
  except data.DataError as e:
    assert e.reason == "empty_file" and e.file == path, e
    return
  except ValueError as e:
    assert "the dataset has no examples" in str(e) and f"of {n_records} records skipped" in str(e), e
    return
  assert len(ds.examples) + ds.report.skipped == ds.report.total == n_records
  assert set(ds.report.counts) <= reasons
  assert sum(ds.report.by_file.values()) == ds.report.skipped


@pytest.mark.parametrize("kind", [None, "pairwise", "unpaired", "listwise"])
@SETTINGS
@given(st.data())
def test_jsonl_records_load_or_fail_naming_file_and_line(kind, draw):
  raw = lines_of(draw.draw, kind)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "train.jsonl")
    open(path, "wb").write(raw)
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    n = sum(1 for l in body.split(b"\n") if l.strip())
    _check(path, kind, n)


@pytest.mark.parametrize("kind", [None, "pairwise"])
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_parquet_and_array_record_rows_load_or_fail_naming_file_and_row(kind, draw):
  import pyarrow as pa
  import pyarrow.parquet as pq
  names = ("prompt", "response") if kind is None else ("prompt", "chosen", "rejected")
  rows = draw.draw(st.lists(st.fixed_dictionaries({k: st.one_of(text, st.none()) for k in names}), max_size=6))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in names])), path)
    _check(path, kind, len(rows), "parquet")
    if rows:
      path = os.path.join(d, "train.array_record")
      data.write_array_record(path, rows)
      _check(path, kind, len(rows), "array_record")
