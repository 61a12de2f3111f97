"""Parity with lm-evaluation-harness (multiple choice: per-example log-likelihoods, is_greedy, acc, acc_norm)
on tiny random HF checkpoints with tokenizers of two families (BOS added by the post-processor; no BOS at
all), and exports that transformers loads (AutoTokenizer + generate) in the reference environment."""
import json
import os

import ml_collections
import numpy as np
import pytest

import data
import models
from tests import chat_tokenizers
from tests import refenv
from train_lib import eval_tasks

pytestmark = pytest.mark.parity

DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "hat rack"], "gold": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "twenty two", "four and a bit"], "gold": 0},
    {"question": "Question: which is a colour?\nAnswer:", "choices": ["red", "the number seven", "blue sky"],
     "gold": 2},
    {"question": "A word that ends in a space ", "choices": ["yes", "no"], "gold": 1},
    {"question": "Caf\u00e9 or tea?", "choices": ["caf\u00e9 au lait", "tea", "water please"], "gold": 1},
    {"question": "Pick the longest", "choices": ["a", "bb", "a much longer answer here"], "gold": 2},
]


def _corpus():
  return [d["question"] + " " + c for d in DOCS for c in d["choices"]] * 3


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def checkpoint(request, tmp_path_factory):
  refenv.require()
  root = tmp_path_factory.mktemp(f"lmeval_{request.param}")
  model_dir = str(root / "model")
  chat_tokenizers.make(request.param, model_dir, _corpus(), vocab_size=300)
  tok = data.load_tokenizer(model_dir)
  task = str(root / "mc.jsonl")
  with open(task, "w", encoding="utf-8") as f:
    for d in DOCS:
      f.write(json.dumps(d) + "\n")
  ref = refenv.run("lmeval_mc", model_dir=model_dir, task_file=task, vocab_size=tok.vocab_size, make="llama")
  return model_dir, task, tok, ref


def test_multiple_choice_equals_lm_eval(checkpoint):
  model_dir, task, tok, ref = checkpoint
  cfg, params = models.load_hf(model_dir)
  model = models.Decoder(cfg)
  ec = ml_collections.ConfigDict(dict(batch_size=4, mc_template="{question}", target_delimiter=" ", max_len=128))
  metrics, per_doc = eval_tasks.run_mc(model, params, tok, eval_tasks.read_jsonl(task), ec, where=task)
  lls = np.concatenate([np.asarray(l) for l, _ in per_doc])
  greedy = np.concatenate([np.asarray(g) for _, g in per_doc])
  print(f"max relative difference of the log-likelihoods: {np.max(np.abs(lls - ref['lls']) / np.abs(ref['lls'])):.2e}")
  np.testing.assert_allclose(lls, ref["lls"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(greedy, ref["greedy"])
  ours = [eval_tasks.mc_scores(l, d["choices"], d["gold"]) for (l, _), d in zip(per_doc, DOCS)]
  np.testing.assert_array_equal([o["acc"] for o in ours], ref["acc"])
  np.testing.assert_array_equal([o["acc_norm"] for o in ours], ref["acc_norm"])
  assert metrics["acc"] == pytest.approx(float(ref["acc_mean"]))
  assert metrics["acc_norm"] == pytest.approx(float(ref["acc_norm_mean"]))


def test_multiple_choice_with_chat_template_equals_lm_eval(checkpoint):
  """lm-eval's --apply_chat_template: the context as one user turn with the generation prompt, choices
  with no delimiter; the log-likelihoods of the chat-wrapped requests equal ours."""
  model_dir, task, tok, _ = checkpoint
  ref = refenv.run("lmeval_mc", model_dir=model_dir, task_file=task, vocab_size=tok.vocab_size, chat=1)
  cfg, params = models.load_hf(model_dir)
  ec = ml_collections.ConfigDict(dict(batch_size=4, mc_template="{question}", target_delimiter=" ", max_len=256,
                                      apply_chat_template=True))
  metrics, per_doc = eval_tasks.run_mc(models.Decoder(cfg), params, tok, eval_tasks.read_jsonl(task), ec, where=task)
  lls = np.concatenate([np.asarray(l) for l, _ in per_doc])
  np.testing.assert_allclose(lls, ref["lls"], rtol=1e-4, atol=1e-5)
  assert metrics["acc"] == pytest.approx(float(ref["acc_mean"]))
  plain = eval_tasks.run_mc(models.Decoder(cfg), params, tok, eval_tasks.read_jsonl(task),
                            ml_collections.ConfigDict({**ec.to_dict(), "apply_chat_template": False}), where=task)[1]
  assert not np.allclose(lls, np.concatenate([np.asarray(l) for l, _ in plain]))   # the template matters
