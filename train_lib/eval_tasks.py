"""Evaluation tasks from data files in the lm-evaluation-harness style: multiple choice, generation with
answer extraction, perplexity. (Preference pairs and win rates: `train_lib.judges`.)

    --config.eval.tasks='mc:data/arc_easy.jsonl,gen:data/gsm8k.jsonl,ppl:data/wiki.jsonl'

A task is `KIND:PATH` (or just `PATH`, the kind then detected from the first record's fields); its metrics
are reported as `NAME/metric` with NAME the file's stem. One JSON record a line:

    mc    {"question": "...", "choices": ["...", "..."], "gold": 1}
          question: `question` (or `query` / `prompt` / `ctx`, used verbatim); the context is
          `config.eval.mc_template` formatted with the record ("Question: {question}\\nAnswer:" by default;
          a record with `query` or `prompt` uses it as is). choices: a list, or {"text": [...], "label": [...]}
          (ARC on the Hub). gold: an index, a choice label ("B") or a choice's text (also `label`, `answer`,
          `answerKey`).
          acc: the choice with the highest summed log-likelihood of `target_delimiter + choice` given the
          context is gold. acc_norm: the same with each log-likelihood divided by len(choice) in characters
          (lm-eval 0.4's `acc_norm`: the choice's text without the delimiter); acc_bytes: by its UTF-8
          bytes. Ties go to the first choice (numpy argmax).
    gen   {"question": "...", "answer": "... #### 42"}  (or `prompt` verbatim; `target` for the answer)
          the prompt is `config.eval.gen_template` ("Question: {question}\\nAnswer:"), greedy decoding up to
          `max_new_tokens` or a stop token (`data.stop_ids`), cut at the first `config.eval.until` string;
          strict_match / flexible_extract (lm-eval's gsm8k filters) and regex_match (`eval.answer_regex`).
    `config.eval.apply_chat_template=True` (lm-eval's `--apply_chat_template`): the mc context and the gen
          prompt become one user turn of the checkpoint's chat template with its generation prompt, and mc
          choices follow it with no delimiter (as lm-eval 0.4 does).
    ppl   {"text": "..."}   token_perplexity, word_perplexity, byte_perplexity, bits_per_byte over all
          documents (lm-eval's `loglikelihood_rolling` windows of `eval.max_len` tokens; words split on
          whitespace).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

import data as data_lib
from train_lib import answers
from train_lib import generation as gen_lib
from train_lib import loglik

KINDS = ("mc", "gen", "ppl", "pref", "winrate")
_QUESTION = ("question", "query", "prompt", "ctx")
_GOLD = ("gold", "label", "answer", "answerKey")


def parse_tasks(spec) -> list[tuple[str, str, str]]:
  """'mc:a.jsonl,b.jsonl' -> [(kind, name, path)], kinds detected where not given."""
  items = spec if isinstance(spec, (list, tuple)) else [s for s in (spec or "").split(",") if s.strip()]
  out = []
  for item in items:
    item = item.strip()
    kind, sep, path = item.partition(":")
    if not sep or kind not in KINDS:
      kind, path = None, item
    if not os.path.exists(path):
      raise FileNotFoundError(f"eval task file {path!r} not found (config.eval.tasks={spec!r})")
    records = read_jsonl(path, 1)
    kind = kind or detect(records[0] if records else {}, path)
    out.append((kind, os.path.splitext(os.path.basename(path))[0], path))
  return out


def detect(record: dict, path: str = "") -> str:
  if "choices" in record:
    return "mc"
  if "chosen" in record and "rejected" in record:
    return "pref"
  if any(k in record for k in ("answer", "target")):
    return "gen"
  if "text" in record:
    return "ppl"
  if "prompt" in record or "messages" in record:
    return "winrate"
  raise ValueError(f"{path}: cannot tell the task kind from the fields {sorted(record)}; write KIND:{path} "
                   f"with KIND one of {', '.join(KINDS)}")


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if limit and len(out) >= limit:
        break
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
  return out


# ---- multiple choice ---------------------------------------------------------------------------------
def mc_doc(record: dict, template: str, where: str = "") -> tuple[str, list[str], int]:
  """(context, choices, gold index) of a multiple-choice record."""
  choices = record.get("choices")
  labels = None
  if isinstance(choices, dict):
    choices, labels = choices.get("text"), choices.get("label")
  if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings (or {{text, label}})")
  context = next((record[k] for k in ("query", "prompt") if isinstance(record.get(k), str)), None)
  if context is None:
    try:
      context = template.format(**record)
    except KeyError as e:
      raise ValueError(f"{where}: the template {template!r} needs field {e}") from None
  gold = next((record[k] for k in _GOLD if k in record), None)
  if isinstance(gold, str) and not gold.lstrip("-").isdigit():
    if labels and gold in labels:
      gold = labels.index(gold)
    elif gold in choices:
      gold = choices.index(gold)
    elif len(gold) == 1 and gold.isalpha():
      gold = ord(gold.upper()) - ord("A")
  try:
    gold = int(gold)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: gold answer {gold!r} (field {'/'.join(_GOLD)}) is no choice") from None
  if not 0 <= gold < len(choices):
    raise ValueError(f"{where}: gold index {gold} outside the {len(choices)} choices")
  return context, choices, gold


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
  """lm-eval's multiple-choice `process_results` for one document."""
  lls = np.asarray(lls, np.float64)
  chars = np.array([float(len(c)) for c in choices])
  nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
  return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / chars) == gold),
          "acc_bytes": float(np.argmax(lls / nbytes) == gold)}


def chat_wrap(tokenizer, text: str) -> str:
  """`text` as one user turn of the checkpoint's chat template, with the generation prompt (lm-eval's
  `--apply_chat_template` without few-shot turns or a system instruction)."""
  try:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
  except (AttributeError, ValueError) as e:
    raise ValueError(f"eval.apply_chat_template=True needs a tokenizer with a chat template ({e})") from None


def run_mc(model, params, tokenizer, records, ec, mesh=None, where: str = "") -> tuple[dict, list]:
  """Metrics (means over documents) and per-document [(lls, is_greedy)]."""
  docs = [mc_doc(r, ec.get("mc_template", "Question: {question}\nAnswer:"), f"{where}:{i + 1}")
          for i, r in enumerate(records)]
  delim = ec.get("target_delimiter", " ")
  if ec.get("apply_chat_template", False):
    # lm-eval 0.4: a chat-wrapped context ends with the assistant header, so the choice follows it with no
    # delimiter.
    docs = [(chat_wrap(tokenizer, ctx), choices, gold) for ctx, choices, gold in docs]
    delim = ""
  pairs = [loglik.encode_pair(tokenizer, ctx, delim + c) for ctx, choices, _ in docs for c in choices]
  lls, greedy = loglik.loglikelihoods(model, params, pairs, batch_size=ec.batch_size,
                                      max_len=ec.get("max_len", 2048), mesh=mesh, pad_id=tokenizer.pad_id)
  per_doc, sums, k = [], {}, 0
  for ctx, choices, gold in docs:
    doc_lls, doc_greedy = lls[k:k + len(choices)], greedy[k:k + len(choices)]
    k += len(choices)
    per_doc.append((doc_lls.tolist(), doc_greedy.tolist()))
    for name, v in mc_scores(doc_lls, choices, gold).items():
      sums[name] = sums.get(name, 0.0) + v
  return {name: v / max(len(docs), 1) for name, v in sums.items()}, per_doc


# ---- generation with answer extraction -----------------------------------------------------------------
def gen_doc(record: dict, template: str, where: str = "") -> tuple[str, str]:
  prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else None
  if prompt is None:
    try:
      prompt = template.format(**record)
    except KeyError as e:
      raise ValueError(f"{where}: the template {template!r} needs field {e}") from None
  gold = next((record[k] for k in ("answer", "target") if k in record), None)
  if gold is None:
    raise ValueError(f"{where}: a generation task record needs 'answer' or 'target'")
  return prompt, answers.gold_answer(str(gold))


def generate_texts(model, params, tokenizer, prompts: Sequence[str], ec, until: Sequence[str] = ()) -> list[str]:
  """Greedy continuations of text prompts (encoded as training encodes them), stopped at `data.stop_ids`
  and cut at the first of the `until` strings."""
  stops = data_lib.stop_ids(tokenizer)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  out = []
  for i in range(0, len(prompts), ec.batch_size):
    chunk = [data_lib.encode_prompt(tokenizer, p) for p in prompts[i:i + ec.batch_size]]
    ids = gen_lib.generate(model, params, chunk, max_new_tokens=ec.max_new_tokens, stop_ids=stops, pad_id=pad)
    for o in ids:
      text = tokenizer.decode(o)
      for u in until:
        if u and u in text:
          text = text[:text.index(u)]
      out.append(text)
  return out


def run_gen(model, params, tokenizer, records, ec, where: str = "") -> tuple[dict, list]:
  docs = [gen_doc(r, ec.get("gen_template", "Question: {question}\nAnswer:"), f"{where}:{i + 1}")
          for i, r in enumerate(records)]
  until = [u for u in (ec.get("until", "Question:") or "").split("|") if u]
  prompts = [p for p, _ in docs]
  if ec.get("apply_chat_template", False):
    prompts = [chat_wrap(tokenizer, p) for p in prompts]
  texts = generate_texts(model, params, tokenizer, prompts, ec, until)
  rules = answers.rules(ec.get("answer_regex") or None)
  sums = {name: 0.0 for name in rules}
  for (_, gold), text in zip(docs, texts):
    for name, rule in rules.items():
      sums[name] += answers.is_correct(answers.extract(text, rule), gold)
  return {k: v / max(len(docs), 1) for k, v in sums.items()}, texts


# ---- perplexity -------------------------------------------------------------------------------------
def run_ppl(model, params, tokenizer, records, ec, mesh=None, where: str = "") -> dict:
  texts = []
  for i, r in enumerate(records):
    if not isinstance(r.get("text"), str):
      raise ValueError(f"{where}:{i + 1}: a perplexity record needs a string field 'text'")
    texts.append(r["text"])
  pairs, owner = [], []
  for j, t in enumerate(texts):
    windows = loglik.rolling_windows(tokenizer.encode(t), loglik.prefix_token(tokenizer), ec.get("max_len", 2048))
    pairs += windows
    owner += [j] * len(windows)
  lls, _ = loglik.loglikelihoods(model, params, pairs, batch_size=ec.batch_size, max_len=ec.get("max_len", 2048),
                                 mesh=mesh, pad_id=tokenizer.pad_id)
  total = float(np.sum(lls, dtype=np.float64))
  tokens = sum(len(c) for _, c in pairs)
  words = sum(len(t.split()) for t in texts)
  nbytes = sum(len(t.encode("utf-8")) for t in texts)
  return {"token_perplexity": math.exp(-total / max(tokens, 1)), "word_perplexity": math.exp(-total / max(words, 1)),
          "byte_perplexity": math.exp(-total / max(nbytes, 1)), "bits_per_byte": -total / max(nbytes, 1) / math.log(2)}
