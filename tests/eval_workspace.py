"""A tiny Qwen2-style workspace for the README's "Evaluation" example and the end-to-end tests: a random
Qwen2-shaped HF checkpoint (qkv biases, tied embeddings) with a ChatML tokenizer that has no BOS token
(tests/chat_tokenizers.py), and small JSONL files in common formats.

    make(root) -> {"ckpt": root/ckpt, "data": root/data}

data/ holds sft_{train,test}.jsonl (OpenAI messages), prefs_{train,test}.jsonl (TRL conversational
prompt/chosen/rejected), arc.jsonl (multiple choice, ARC's {text, label} choices), gsm8k.jsonl (question,
answer with `#### N`), wiki.jsonl (text) and prompts.jsonl (messages, for win rates).
"""
from __future__ import annotations

import json
import os

import jax

from tests import chat_tokenizers


def _problems(n, offset=0):
  out = []
  for i in range(n):
    a, b = (i * 7 + offset) % 10, (i * 3 + 1 + offset) % 10
    out.append((f"What is {a}+{b}?", f"{a}+{b}={a + b}. #### {a + b}", f"{a}+{b}={a + b + 1}. #### {a + b + 1}"))
  return out


def _write(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


# Qwen2's pre-tokenization (digits one by one), as its tokenizer.json has it. transformers 5 picks the
# tokenizer class from config.json's model_type and a Qwen2Tokenizer sets these itself, so a tokenizer.json
# that lacked them would encode differently there than with the `tokenizers` library.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _qwen2_pre_tokenizer(path: str) -> None:
  from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers   # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(path)
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.save(path)


def make(root: str) -> dict:
  import models   # pylint: disable=g-import-not-at-top
  ckpt, data_dir = os.path.join(root, "ckpt"), os.path.join(root, "data")
  os.makedirs(data_dir, exist_ok=True)
  train, test = _problems(24), _problems(6, offset=5)
  corpus = [q + " " + a + " " + r for q, a, r in train + test] + ["The sky is blue. Grass is green. red blue"]
  chat_tokenizers.make("qwen2", ckpt, corpus, vocab_size=300)
  _qwen2_pre_tokenizer(os.path.join(ckpt, "tokenizer.json"))
  import data   # pylint: disable=g-import-not-at-top
  tok = data.load_tokenizer(ckpt)
  cfg = models.DecoderConfig.tiny(vocab_size=tok.vocab_size, qkv_bias=True, tie_embeddings=True)
  models.save_hf(ckpt, cfg, models.Decoder(cfg).init(jax.random.PRNGKey(0)), model_type="qwen2",
                 eos_token_id=tok.eos_id)
  user = lambda q: [{"role": "user", "content": q}]
  bot = lambda a: [{"role": "assistant", "content": a}]
  for split, probs in (("train", train), ("test", test)):
    _write(os.path.join(data_dir, f"sft_{split}.jsonl"), [{"messages": user(q) + bot(a)} for q, a, _ in probs])
    _write(os.path.join(data_dir, f"prefs_{split}.jsonl"),
           [{"prompt": user(q), "chosen": bot(a), "rejected": bot(r)} for q, a, r in probs])
  _write(os.path.join(data_dir, "arc.jsonl"), [
      {"question": "What colour is the sky?", "choices": {"text": ["blue", "green", "red"], "label": ["A", "B", "C"]},
       "answerKey": "A"},
      {"question": "What colour is grass?", "choices": {"text": ["blue", "green", "red"], "label": ["A", "B", "C"]},
       "answerKey": "B"}])
  _write(os.path.join(data_dir, "gsm8k.jsonl"), [{"question": q, "answer": a} for q, a, _ in test])
  _write(os.path.join(data_dir, "wiki.jsonl"), [{"text": "The sky is blue. Grass is green."}])
  _write(os.path.join(data_dir, "prompts.jsonl"), [{"messages": user(q)} for q, _, _ in test])
  return {"ckpt": ckpt, "data": data_dir}
