"""`python -m data.prepare`: tiny files in each public format -> the project's records, with the counts
checked (the expected counts are patched to the tiny files' sizes; a wrong count stops naming both)."""
import csv
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
from data import prepare as prep


def _jsonl(path, rows, gz=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt") as f:
      f.write(text)
  else:
    open(path, "w").write(text)


def _read(path):
  return [json.loads(l) for l in open(path)]


@pytest.fixture
def counts(monkeypatch):
  def set_(**kw):
    monkeypatch.setitem(prep.EXPECTED, kw.pop("key"), kw.pop("n"))
  return set_


CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def _uf_row(i):
  p = f"prompt {i}"
  return {"prompt": p, "prompt_id": str(i),
          "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": f"good {i}"}],
          "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": f"bad {i}"}],
          "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"good {i}"}],
          "score_chosen": 8.0, "score_rejected": 3.0}


def test_ultrafeedback_binarized_parquet(tmp_path, counts):
  src = tmp_path / "uf" / "data"
  os.makedirs(src)
  pq.write_table(pa.Table.from_pylist([_uf_row(i) for i in range(5)]), src / "train_prefs-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist([_uf_row(i) for i in range(5, 7)]), src / "test_prefs-00000-of-00001.parquet")
  counts(key="ultrafeedback_binarized/train", n=5)
  counts(key="ultrafeedback_binarized/test", n=2)
  out = tmp_path / "out"
  res = prep.prepare("ultrafeedback_binarized", str(tmp_path / "uf"), str(out))
  assert res == {"train": (5, ""), "test": (2, "")}
  assert _read(out / "train.jsonl")[3]["chosen"][1]["content"] == "good 3"
  # The project's reader takes it as the recipe does (format ultrafeedback_binarized, pairwise).
  cfg = data.default_config()
  cfg.update(dict(source="jsonl", path=str(out / "{split}.jsonl"), format="ultrafeedback_binarized",
                  pref_kind="pairwise", tokenizer="char", chat_template=CHAT))
  batch = next(iter(data.get_dataset(cfg, "train", tokenizer=data.get_tokenizer(cfg), batch_size=2, seq_len=48,
                                     seed=0)))
  assert batch["inputs"].shape == (2, 2, 48)
  # A wrong count stops, naming both numbers; --allow_count_mismatch writes with the warning.
  counts(key="ultrafeedback_binarized/train", n=61_135)
  with pytest.raises(prep.CountMismatch, match="expected 61,135 records, got 5"):
    prep.prepare("ultrafeedback_binarized", str(tmp_path / "uf"), str(out))
  res = prep.prepare("ultrafeedback_binarized", str(tmp_path / "uf"), str(out), allow_count_mismatch=True)
  assert "expected 61,135" in res["train"][1]


def test_c4_shards(tmp_path, counts, monkeypatch):
  src = tmp_path / "c4"
  for i in range(2):
    _jsonl(str(src / f"c4-train.{i:05d}-of-00002.json.gz"),
           [{"text": f"doc {i}-{j}", "timestamp": "t", "url": "u"} for j in range(3)], gz=True)
  _jsonl(str(src / "c4-validation.00000-of-00001.json"), [{"text": "val", "timestamp": "t", "url": "u"}])
  monkeypatch.setattr(prep, "C4_SHARDS", {"train": 2, "validation": 8})   # validation: a partial copy
  counts(key="c4/train", n=6)
  res = prep.prepare("c4", str(src), str(tmp_path / "out"))
  assert res["train"] == (6, "")
  assert res["validation"][0] == 1 and "1 of 8 shards" in res["validation"][1]
  assert _read(tmp_path / "out" / "train.jsonl")[4] == {"text": "doc 1-1"}
  counts(key="c4/train", n=7)
  with pytest.raises(prep.CountMismatch, match="expected 7 records, got 6"):
    prep.prepare("c4", str(src), str(tmp_path / "out"))


def test_commonsense_suites(tmp_path, counts):
  src = tmp_path / "cs"
  os.makedirs(src)
  json.dump([{"instruction": "q?", "input": "", "output": "the answer is true", "answer": "true"}] * 3,
            open(src / "commonsense_170k.json", "w"))
  rows = {
      "boolq": {"question": "is it", "passage": "P.", "answer": True},
      "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
      "social_i_qa": {"context": "c.", "question": "q?", "answerA": "a", "answerB": "b", "answerC": "c",
                      "label": "3"},
      "hellaswag": {"ctx": "c", "endings": ["e0", "e1", "e2", "e3"], "label": "2"},
      "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"},
      "ARC-Easy": {"question": {"stem": "s?", "choices": [{"text": "t1", "label": "A"}, {"text": "t2", "label": "B"}]},
                   "answerKey": "B"},
      "ARC-Challenge": {"question": "s?", "choices": {"text": ["t1", "t2", "t3"], "label": ["1", "2", "3"]},
                        "answerKey": "3"},
      "openbookqa": {"question_stem": "o?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
  }
  gold = {"boolq": 1, "piqa": 1, "social_i_qa": 2, "hellaswag": 2, "winogrande": 1, "ARC-Easy": 1,
          "ARC-Challenge": 2, "openbookqa": 0}
  for name, r in rows.items():
    _jsonl(str(src / f"{name}.jsonl"), [r, r])
    counts(key=f"commonsense/{name}", n=2)
  counts(key="commonsense/commonsense_170k_train", n=3)
  out = tmp_path / "out"
  res = prep.prepare("commonsense", str(src), str(out))
  assert len(res) == 9 and all(w == "" for _, w in res.values())
  for name, g in gold.items():
    rec = _read(out / f"{name}.jsonl")[0]
    assert rec["gold"] == g and len(rec["choices"]) >= 2, name
  assert _read(out / "commonsense_170k_train.jsonl")[0] == {"instruction": "q?", "input": "",
                                                           "output": "the answer is true"}


def test_gsm8k_mmlu_alpaca(tmp_path, counts):
  src = tmp_path / "gsm"
  _jsonl(str(src / "train.jsonl"), [{"question": "1+1?", "answer": "2 #### 2"}] * 3)
  _jsonl(str(src / "test.jsonl"), [{"question": "2+2?", "answer": "4 #### 4"}])
  counts(key="gsm8k/train", n=3)
  counts(key="gsm8k/test", n=1)
  res = prep.prepare("gsm8k", str(src), str(tmp_path / "g"))
  assert res == {"train": (3, ""), "test": (1, "")}
  assert _read(tmp_path / "g" / "train.jsonl")[0] == {"prompt": "Question: 1+1?\nAnswer:", "completion": " 2 #### 2"}

  mm = tmp_path / "mmlu" / "data" / "test"
  os.makedirs(mm)
  with open(mm / "anatomy_test.csv", "w", newline="") as f:
    csv.writer(f).writerows([["Q1, with a comma", "a", "b", "c", "d", "C"], ["Q2", "a", "b", "c", "d", "A"]])
  counts(key="mmlu/test", n=2)
  prep.prepare("mmlu", str(tmp_path / "mmlu"), str(tmp_path / "m"))
  rec = _read(tmp_path / "m" / "test.jsonl")[0]
  assert rec == {"question": "Q1, with a comma", "choices": ["a", "b", "c", "d"], "gold": 2, "subject": "anatomy"}

  json.dump([{"instruction": "i", "input": "", "output": "o"}] * 4, open(tmp_path / "alpaca_gpt4_data.json", "w"))
  counts(key="alpaca_gpt4/train", n=5)
  with pytest.raises(prep.CountMismatch, match="alpaca_gpt4/train: expected 5 records, got 4"):
    prep.prepare("alpaca_gpt4", str(tmp_path / "alpaca_gpt4_data.json"), str(tmp_path / "a"))


def test_command_line(tmp_path, capsys):
  assert prep.main(["gsm8k", f"--src={tmp_path}/missing", f"--out={tmp_path}/o"]) == 2
  assert "no such file" in capsys.readouterr().err
