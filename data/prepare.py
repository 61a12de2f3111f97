r"""Prepares a paper recipe's dataset from a local copy in its public format into the project's files.

    python -m data.prepare ultrafeedback_binarized --src=DIR --out=data/paper/ultrafeedback
    python -m data.prepare c4 --src=DIR --out=data/paper/c4
    python -m data.prepare commonsense --src=DIR --out=data/paper/commonsense
    python -m data.prepare gsm8k --src=DIR --out=data/paper/gsm8k
    python -m data.prepare mmlu --src=DIR --out=data/paper/mmlu
    python -m data.prepare alpaca_gpt4 --src=FILE --out=data/paper/alpaca_gpt4
    python -m data.prepare ultrafeedback --src=FILE_OR_DIR --out=data/paper/ultrafeedback_lists

What each reads (`--src`) and writes (`--out`, JSON lines), and the record counts it checks:

  ultrafeedback_binarized  HuggingFaceH4/ultrafeedback_binarized Parquet: `train_prefs-*.parquet`,
                           `test_prefs-*.parquet` (anywhere under DIR) -> train.jsonl, test.jsonl, records
                           unchanged (`format=ultrafeedback_binarized`); 61,135 and 2,000.
  c4                       allenai/c4 `en` shards `c4-train.*-of-01024.json[.gz]`, `c4-validation.*-of-00008.
                           json[.gz]` -> train.jsonl, validation.jsonl of {"text"}; 364,868,892 and 364,608 when
                           every shard is there (a partial copy is counted, not checked, and says so).
  commonsense              LLM-Adapters' `commonsense_170k.json` (a JSON list of {instruction, input, output})
                           -> commonsense_170k_train.jsonl (alpaca; 170,420), and each suite's public JSONL
                           `<suite>.jsonl` -> `<suite>.jsonl` mc records {question, choices, gold}: boolq
                           (3,270), piqa (1,838), social_i_qa (1,954), hellaswag (10,042), winogrande (1,267),
                           ARC-Easy (2,376), ARC-Challenge (1,172), openbookqa (500).
  gsm8k                    openai/grade-school-math `train.jsonl`, `test.jsonl` ({question, answer}) ->
                           train.jsonl {prompt, completion} and test.jsonl gen records; 7,473 and 1,319.
  mmlu                     hendrycks/test `data/test/<subject>_test.csv` (no header: question, A, B, C, D,
                           answer) -> test.jsonl mc records with `subject`; 14,042 over 57 subjects.
  alpaca_gpt4              `alpaca_gpt4_data.json` (a JSON list) -> train.jsonl (alpaca); 52,002.
  ultrafeedback            openbmb/UltraFeedback JSONL ({instruction, completions: [{response,
                           overall_score}]}) -> train.jsonl / test.jsonl (every 50th prompt) with the
                           completions as a scored list (`format=ultrafeedback`); 63,967 prompts.

A count other than the expected one stops with both numbers named (`--allow_count_mismatch` writes anyway,
with a warning). The expected counts are the datasets' cards and the papers' (README "Paper recipes").
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import json
import os
import sys
from typing import Callable, Iterable, Iterator

from data._sources import DataError

EXPECTED = {
    "ultrafeedback_binarized/train": 61_135, "ultrafeedback_binarized/test": 2_000,
    "c4/train": 364_868_892, "c4/validation": 364_608,
    "commonsense/commonsense_170k_train": 170_420,
    "commonsense/boolq": 3_270, "commonsense/piqa": 1_838, "commonsense/social_i_qa": 1_954,
    "commonsense/hellaswag": 10_042, "commonsense/winogrande": 1_267, "commonsense/ARC-Easy": 2_376,
    "commonsense/ARC-Challenge": 1_172, "commonsense/openbookqa": 500,
    "gsm8k/train": 7_473, "gsm8k/test": 1_319, "mmlu/test": 14_042, "alpaca_gpt4/train": 52_002,
    "ultrafeedback/all": 63_967,
}
C4_SHARDS = {"train": 1024, "validation": 8}


class CountMismatch(DataError):
  pass


def check_count(key: str, actual: int, allow: bool, expected: int | None = None) -> str:
  """'' when `actual` is the expected count of `key`; else raises CountMismatch (or, with `allow`, returns
  the warning)."""
  expected = EXPECTED[key] if expected is None else expected
  if actual == expected:
    return ""
  msg = f"{key}: expected {expected:,} records, got {actual:,}"
  if not allow:
    raise CountMismatch(msg + " (--allow_count_mismatch to write anyway)")
  print(f"WARNING: {msg}", file=sys.stderr, flush=True)
  return msg


# =====================================================================================================
# Readers of the public formats
# =====================================================================================================
def _open(path: str):
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[dict]:
  with _open(path) as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


def read_json_or_jsonl(path: str) -> Iterator[dict]:
  with _open(path) as f:
    head = f.read(1)
    while head and head.isspace():
      head = f.read(1)
  if head == "[":
    with _open(path) as f:
      yield from json.load(f)
  else:
    yield from read_jsonl(path)


def read_parquet(paths: Iterable[str]) -> Iterator[dict]:
  import pyarrow.parquet as pq   # pylint: disable=g-import-not-at-top
  for path in paths:
    yield from pq.read_table(path).to_pylist()


def write_jsonl(path: str, records: Iterable[dict]) -> int:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  n = 0
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, path)
  return n


def _find(src: str, pattern: str) -> list[str]:
  return sorted(glob.glob(os.path.join(src, "**", pattern), recursive=True))


def _required(src: str, pattern: str) -> list[str]:
  files = _find(src, pattern)
  if not files:
    raise DataError(f"no file matching {pattern!r} under {src}")
  return files


# =====================================================================================================
# The commonsense suites: public records -> mc records {question, choices, gold}
# =====================================================================================================
def _mc(question: str, choices: list, gold) -> dict:
  return {"question": question, "choices": [str(c) for c in choices], "gold": gold}


def _arc(r: dict) -> dict:
  q = r["question"]
  if isinstance(q, dict):                        # AI2's original JSONL: {"question": {"stem", "choices"}}
    stem, choices = q["stem"], q["choices"]
    texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
  else:                                          # the Hub's: question, choices {text, label}
    stem = q if "question_stem" not in r else r["question_stem"]
    texts, labels = r["choices"]["text"], r["choices"]["label"]
  return _mc(stem, texts, labels.index(r["answerKey"]))


def _obqa(r: dict) -> dict:
  if "question_stem" in r:
    return _mc(r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
  return _arc(r)


def _winogrande(r: dict) -> dict:
  # lm-eval's partial scoring reduced to a plain mc record: the context up to the blank with each option,
  # scored on the rest of the sentence, becomes "sentence with the blank" -> the option.
  return _mc(r["sentence"], [r["option1"], r["option2"]], int(r["answer"]) - 1)


SUITES: dict[str, Callable[[dict], dict]] = {
    "boolq": lambda r: _mc(f"{r['passage']}\nQuestion: {r['question']}?", ["no", "yes"], int(bool(r["answer"]))),
    "piqa": lambda r: _mc(r["goal"], [r["sol1"], r["sol2"]], int(r["label"])),
    "social_i_qa": lambda r: _mc(f"{r['context']} {r['question']}", [r["answerA"], r["answerB"], r["answerC"]],
                                 int(r["label"]) - 1),
    "hellaswag": lambda r: _mc(r["ctx"], r["endings"], int(r["label"])),
    "winogrande": _winogrande,
    "ARC-Easy": _arc,
    "ARC-Challenge": _arc,
    "openbookqa": _obqa,
}


# =====================================================================================================
# The datasets
# =====================================================================================================
def prepare_ultrafeedback_binarized(src, out, allow):
  res = {}
  for split, name in (("train", "train_prefs"), ("test", "test_prefs")):
    n = write_jsonl(os.path.join(out, f"{split}.jsonl"), read_parquet(_required(src, f"{name}-*.parquet")))
    res[split] = (n, check_count(f"ultrafeedback_binarized/{split}", n, allow))
  return res


def prepare_c4(src, out, allow):
  res = {}
  for split, shards in C4_SHARDS.items():
    files = [f for f in _find(src, f"c4-{split}.*") if f.endswith((".json", ".json.gz"))]
    if not files:
      raise DataError(f"no c4-{split}.*.json[.gz] shard under {src}")
    n = write_jsonl(os.path.join(out, f"{split}.jsonl"),
                    ({"text": r["text"]} for f in files for r in read_jsonl(f)))
    if len(files) == shards:
      res[split] = (n, check_count(f"c4/{split}", n, allow))
    else:
      msg = f"c4/{split}: {len(files)} of {shards} shards, {n:,} records (a partial copy: not checked)"
      print(msg, flush=True)
      res[split] = (n, msg)
  return res


def prepare_commonsense(src, out, allow):
  res = {}
  train = _find(src, "commonsense_170k.json")
  if train:
    recs = ({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in read_json_or_jsonl(train[0]))
    n = write_jsonl(os.path.join(out, "commonsense_170k_train.jsonl"), recs)
    res["commonsense_170k_train"] = (n, check_count("commonsense/commonsense_170k_train", n, allow))
  for suite, convert in SUITES.items():
    files = _find(src, f"{suite}.jsonl")
    if not files:
      continue
    n = write_jsonl(os.path.join(out, f"{suite}.jsonl"), (convert(r) for r in read_jsonl(files[0])))
    res[suite] = (n, check_count(f"commonsense/{suite}", n, allow))
  if not res:
    raise DataError(f"neither commonsense_170k.json nor any of {', '.join(s + '.jsonl' for s in SUITES)} "
                    f"under {src}")
  return res


def prepare_gsm8k(src, out, allow):
  train = ({"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]}
           for r in read_jsonl(_required(src, "train.jsonl")[0]))
  n_train = write_jsonl(os.path.join(out, "train.jsonl"), train)
  test = ({"question": r["question"], "answer": r["answer"]} for r in read_jsonl(_required(src, "test.jsonl")[0]))
  n_test = write_jsonl(os.path.join(out, "test.jsonl"), test)
  return {"train": (n_train, check_count("gsm8k/train", n_train, allow)),
          "test": (n_test, check_count("gsm8k/test", n_test, allow))}


def prepare_mmlu(src, out, allow):
  files = _required(src, "*_test.csv")

  def records():
    for path in files:
      subject = os.path.basename(path)[: -len("_test.csv")]
      with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
          q, *choices, answer = row
          yield {**_mc(q, choices, "ABCD".index(answer.strip())), "subject": subject}
  n = write_jsonl(os.path.join(out, "test.jsonl"), records())
  return {"test": (n, check_count("mmlu/test", n, allow))}


def prepare_alpaca_gpt4(src, out, allow):
  path = src if os.path.isfile(src) else _required(src, "alpaca_gpt4_data*.json")[0]
  recs = ({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
          for r in read_json_or_jsonl(path))
  n = write_jsonl(os.path.join(out, "train.jsonl"), recs)
  return {"train": (n, check_count("alpaca_gpt4/train", n, allow))}


def prepare_ultrafeedback(src, out, allow):
  files = [src] if os.path.isfile(src) else _required(src, "*.jsonl")
  rows = [r for f in files for r in read_jsonl(f)]
  msg = check_count("ultrafeedback/all", len(rows), allow)
  n_test = write_jsonl(os.path.join(out, "test.jsonl"), (r for i, r in enumerate(rows) if i % 50 == 49))
  n_train = write_jsonl(os.path.join(out, "train.jsonl"), (r for i, r in enumerate(rows) if i % 50 != 49))
  return {"train": (n_train, msg), "test": (n_test, msg)}


DATASETS = {
    "ultrafeedback_binarized": prepare_ultrafeedback_binarized, "c4": prepare_c4,
    "commonsense": prepare_commonsense, "gsm8k": prepare_gsm8k, "mmlu": prepare_mmlu,
    "alpaca_gpt4": prepare_alpaca_gpt4, "ultrafeedback": prepare_ultrafeedback,
}


def prepare(dataset: str, src: str, out: str, allow_count_mismatch: bool = False) -> dict:
  """{file stem: (records written, '' or the count warning)}."""
  if dataset not in DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
  if not os.path.exists(src):
    raise DataError(f"--src={src}: no such file or directory")
  return DATASETS[dataset](src, out, allow_count_mismatch)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("dataset", choices=sorted(DATASETS))
  p.add_argument("--src", required=True, help="the local copy in its public format")
  p.add_argument("--out", required=True, help="the directory the project's files go to")
  p.add_argument("--allow_count_mismatch", action="store_true")
  a = p.parse_args(argv)
  try:
    res = prepare(a.dataset, a.src, a.out, a.allow_count_mismatch)
  except DataError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    return 2
  for stem, (n, warning) in res.items():
    print(f"{os.path.join(a.out, stem)}.jsonl: {n:,} records" + (f"  ({warning})" if warning else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
