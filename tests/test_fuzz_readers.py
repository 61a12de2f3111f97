"""Property-based (hypothesis) fuzzing of every reader (issue 11 part 9): random and mutated records in
JSONL, Parquet and array_record files, read as SFT, pairwise, unpaired and listwise data, in the project's `fields` format and in every public format
of data/FORMATS.md (conversations rendered with a ChatML template). Each file
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


def lines_of(draw, kind, records=None):
  """JSONL lines: records, and now and then broken bytes, a torn line, a non-object or a BOM."""
  out = []
  for rec in draw(st.lists(records if records is not None else record(kind), min_size=0, max_size=8)):
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


def _cfg(path, kind, source="jsonl", skip=False, fmt="fields", tokenizer="char"):
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.tokenizer, cfg.skip_invalid = source, path, tokenizer, skip
  cfg.pref_kind, cfg.format = kind, fmt
  return cfg


def _check(path, kind, n_records, source="jsonl", fmt="fields", tok=TOK, tokenizer="char"):
  reasons = set(data.PREF_REASONS if kind else data.REASONS)
  seq_len = 12 if fmt == "fields" else 320      # room for a template (Alpaca's is ~200 characters)
  try:
    ds = data.get_dataset(_cfg(path, kind, source, fmt=fmt, tokenizer=tokenizer), "train", tokenizer=tok,
                          batch_size=2, seq_len=seq_len)
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
    ds = data.get_dataset(_cfg(path, kind, source, skip=True, fmt=fmt, tokenizer=tokenizer), "train",
                          tokenizer=tok, batch_size=2, seq_len=seq_len)
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


# ------------------------------------------------------------------------------------------------
# The public formats (data/FORMATS.md), rendered with a chat template where they hold conversations.
# ------------------------------------------------------------------------------------------------
role = st.one_of(st.sampled_from(["user", "assistant", "system", "developer"]), st.sampled_from(["robot", ""]),
                 st.none(), st.integers(0, 2))
content = st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2),
                    st.none(), st.integers(0, 2))


words = st.text(alphabet="0123456789 +=abc", min_size=1, max_size=8).filter(str.strip)
sometimes = st.sampled_from([0, 0, 0, 1])        # how many mutations: most records stay well-formed


@st.composite
def conversation(draw, roles=("user", "assistant"), prompt=None):
  """A conversation that is mostly well-formed (alternating turns ending with the assistant), now and then
  with a wrong role, a wrong content type, a missing key or a message that is not an object."""
  msgs = prompt or [{"role": roles[i % 2], "content": draw(words)} for i in range(2 * draw(st.integers(0, 1)) + 1)]
  msgs = [dict(m) for m in msgs] + [{"role": roles[1], "content": draw(words)}]
  for _ in range(draw(sometimes)):
    if not msgs:
      break
    i = draw(st.integers(0, len(msgs) - 1))
    how = draw(st.sampled_from(["role", "content", "drop", "not_dict"]))
    if how == "role":
      msgs[i]["role"] = draw(role)
    elif how == "content":
      msgs[i]["content"] = draw(content)
    elif how == "drop":
      msgs[i].pop(draw(st.sampled_from(["role", "content"])))
    else:
      msgs[i] = draw(value)
  return msgs


def _hh(draw, prompt):
  if draw(sometimes):          # turns in a random order, or none
    return "".join(f"\n\n{who}: {draw(text)}" for who in draw(st.lists(st.sampled_from(["Human", "Assistant"]),
                                                                        max_size=4)))
  return f"{prompt}\n\nAssistant: {draw(words)}"


@st.composite
def format_record(draw, fmt, kind):
  """A record of a public format, mostly right, with top-level fields dropped or retyped at random."""
  if fmt == "messages":
    r = {"messages": draw(conversation())}
  elif fmt == "trl" and kind is None:
    r = draw(st.one_of(st.builds(lambda p, c: {"prompt": p, "completion": c}, words, words),
                       st.builds(lambda c: {"prompt": c[:-1], "completion": c[-1:]}, conversation()),
                       st.builds(lambda t: {"text": t}, words)))
  elif fmt == "trl":
    prompt = [{"role": "user", "content": draw(words)}]
    r = draw(st.one_of(st.builds(lambda p, c, j: {"prompt": p, "chosen": c, "rejected": j}, words, words, words),
                       st.builds(lambda c, j: {"chosen": c, "rejected": j}, conversation(prompt=prompt),
                                 conversation(prompt=prompt))))
  elif fmt == "alpaca":
    r = {"instruction": draw(words), "input": draw(text), "output": draw(words)}
  elif fmt == "sharegpt":
    r = {"conversations": [{"from": m.get("role", "human") if isinstance(m, dict) else m,
                            "value": m.get("content") if isinstance(m, dict) else m}
                           for m in draw(conversation(roles=("human", "gpt")))]}
  elif fmt == "hh_rlhf":
    prompt = f"\n\nHuman: {draw(words)}"
    r = {"chosen": _hh(draw, prompt), "rejected": _hh(draw, prompt)}
  elif fmt == "ultrafeedback_binarized":
    prompt = draw(words)
    r = {"prompt": prompt, "score_chosen": draw(st.floats(0, 10)), "score_rejected": draw(st.floats(0, 10)),
         "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": draw(words)}],
         "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": draw(words)}]}
  else:   # ultrafeedback (listwise)
    r = {"instruction": draw(words), "completions": [
        {"response": draw(words), "overall_score": draw(st.one_of(st.floats(-5, 10), st.floats(-5, 10), st.none()))}
        for _ in range(draw(st.integers(1, 4)))]}
  for _ in range(draw(sometimes)):        # a top-level mutation
    field = draw(st.sampled_from(sorted(r)))
    if draw(st.booleans()):
      r.pop(field)
    else:
      r[field] = draw(value)
  return r


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
  from tests import chat_tokenizers
  d = chat_tokenizers.make("qwen2", str(tmp_path_factory.mktemp("qwen2")), ["0123456789 +=abc", "Human: hi Assistant: yes"])
  return d, data.load_tokenizer(d)


FORMAT_CASES = [("messages", None), ("trl", None), ("alpaca", None), ("sharegpt", None), ("hh_rlhf", None),
                ("ultrafeedback_binarized", None), ("trl", "pairwise"), ("hh_rlhf", "pairwise"),
                ("ultrafeedback_binarized", "pairwise"), ("ultrafeedback", "listwise")]


@pytest.mark.parametrize("fmt,kind", FORMAT_CASES)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_public_formats_load_or_fail_naming_file_and_line(chat_tok, fmt, kind, draw):
  tok_dir, tok = chat_tok
  raw = lines_of(draw.draw, kind, format_record(fmt, kind))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "train.jsonl")
    open(path, "wb").write(raw)
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    n = sum(1 for l in body.split(b"\n") if l.strip())
    _check(path, kind, n, fmt=fmt, tok=tok, tokenizer=tok_dir)
