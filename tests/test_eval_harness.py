"""The evaluation harness on cases with known answers: GSM8K-style extraction (lm-eval's strict-match and
flexible-extract filters), acc / acc_norm, lm-eval's pair encoding and rolling windows, batched
log-likelihoods against a direct forward pass, win rates with each kind of judge, task-file detection and
errors, and the export's tokenizer and generation config."""
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

import data
import models
from train_lib import answers
from train_lib import eval_tasks
from train_lib import export_files
from train_lib import judges
from train_lib import loglik


# ---- answer extraction ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,strict,flexible", [
    ("She has 3 apples, then 4 more.\n#### 7", "7", "7"),
    ("The answer is 1,234 dollars. #### 1,234", "1,234", "1,234"),
    ("#### -5\nQuestion: next", "-5", "-5"),
    ("So the total is $18.", "[invalid]", "$18."),
    ("First 12 then 30", "[invalid]", "30"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("#### 42 and later 99", "42", "99"),
])
def test_gsm8k_extraction(text, strict, flexible):
  assert answers.extract(text, answers.STRICT) == strict
  assert answers.extract(text, answers.FLEXIBLE) == flexible


@pytest.mark.parametrize("pred,gold,ok", [
    ("7", "Janet sells 16 - 3 - 4 = 9 ... #### 7", True),
    ("1,234", "#### 1234", True),
    ("$18.", "18", True),
    ("18.5", "18", False),
    ("[invalid]", "[invalid]", False),
])
def test_exact_match_after_gsm8k_normalisation(pred, gold, ok):
  assert answers.is_correct(pred, answers.gold_answer(gold)) is ok


def test_user_regex_rule():
  rule = answers.rules(r"answer is (\w+)")["regex_match"]
  assert answers.extract("I think the answer is Paris, really.", rule) == "Paris"
  assert answers.extract("nothing", rule) == answers.INVALID


# ---- multiple choice ----------------------------------------------------------------------------------
def test_acc_and_acc_norm_as_lm_eval():
  # Summed log-likelihood prefers the short choice; per character, the long one.
  choices = ["ab", "abcdefgh"]
  lls = [-2.0, -4.0]
  assert eval_tasks.mc_scores(lls, choices, 0) == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0}
  assert eval_tasks.mc_scores(lls, choices, 1) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
  # acc_norm divides by characters, acc_bytes by UTF-8 bytes: "\u00e9\u00e9" is 2 characters, 4 bytes.
  s = eval_tasks.mc_scores([-2.1, -3.0], ["\u00e9\u00e9", "abc"], 0)
  assert s["acc_norm"] == 0.0 and s["acc_bytes"] == 1.0   # -1.05/char < -1.0/char; -0.525/byte > -1.0/byte


def test_mc_records_in_common_layouts():
  t = "Question: {question}\nAnswer:"
  assert eval_tasks.mc_doc({"question": "q?", "choices": ["a", "b"], "gold": 1}, t) == ("Question: q?\nAnswer:", ["a", "b"], 1)
  arc = {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"}
  assert eval_tasks.mc_doc(arc, t)[2] == 2
  assert eval_tasks.mc_doc({"query": "Q: hi", "choices": ["x", "y"], "label": "1"}, t) == ("Q: hi", ["x", "y"], 1)
  assert eval_tasks.mc_doc({"question": "q", "choices": ["x", "y"], "answer": "y"}, t)[2] == 1
  with pytest.raises(ValueError, match=r"f.jsonl:3: gold index 5 outside the 2 choices"):
    eval_tasks.mc_doc({"question": "q", "choices": ["x", "y"], "gold": 5}, t, "f.jsonl:3")
  with pytest.raises(ValueError, match="needs field 'question'"):
    eval_tasks.mc_doc({"stem": "q", "choices": ["x"], "gold": 0}, t)


class _Tok:
  """Characters are ids (ord); bos 1; no pad; with or without BOS."""
  def __init__(self, bos=True):
    self.bos_id, self.eos_id, self.pad_id = (1 if bos else None), 2, None
    self.add_bos_token = bos
    self.special_ids = frozenset({2})
    self.chat_template = None
    self.vocab_size = 128

  def encode(self, text, add_bos=False, add_eos=False):
    return [self.bos_id] * add_bos + [ord(c) for c in text] + [2] * add_eos

  def decode(self, ids, skip_special=True):
    return "".join(chr(i) for i in ids if i > 2)


def test_encode_pair_moves_trailing_spaces_and_adds_bos_once():
  tok = _Tok()
  ctx, cont = loglik.encode_pair(tok, "Q: x ", "yes")
  assert ctx == [1] + [ord(c) for c in "Q: x"] and cont == [ord(c) for c in " yes"]
  ctx, cont = loglik.encode_pair(_Tok(bos=False), "ab", " c")
  assert ctx == [97, 98] and cont == [32, 99]
  assert loglik.encode_pair(_Tok(bos=False), "", "ab") == ([2], [97, 98])   # no bos: eos is the prefix


def test_rolling_windows_tile_the_document():
  toks = list(range(10, 33))
  windows = loglik.rolling_windows(toks, 1, max_len=8)
  assert windows[0] == ([1], toks[:8])
  assert sum((c for _, c in windows), []) == toks
  for ctx, cont in windows[1:]:
    assert len(ctx) + len(cont) - 1 <= 8 and ctx == toks[toks.index(cont[0]) - len(ctx):toks.index(cont[0])]


@pytest.fixture(scope="module")
def tiny():
  cfg = models.DecoderConfig.tiny().replace(vocab_size=128)
  model = models.Decoder(cfg)
  return model, model.init(jax.random.PRNGKey(0))


def test_loglikelihoods_equal_a_direct_forward_pass(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(3, 128, n)), list(rng.integers(3, 128, m))) for n, m in [(5, 3), (1, 7), (12, 1), (3, 3)]]
  lls, greedy = loglik.loglikelihoods(model, params, pairs, batch_size=3, max_len=64)
  for (ctx, cont), ll, g in zip(pairs, lls, greedy):
    seq = np.asarray(ctx + cont)[None]
    logp = np.asarray(jax.nn.log_softmax(model.apply(params, seq[:, :-1]), -1))[0]
    rows = np.arange(len(ctx) - 1, len(seq[0]) - 1)
    np.testing.assert_allclose(ll, logp[rows, cont].sum(), rtol=1e-5)
    assert g == bool(np.all(logp[rows].argmax(-1) == cont))


def test_task_files_detected_and_scored(tiny, tmp_path):
  model, params = tiny
  files = {"arc": [{"question": "ab", "choices": ["c", "dd"], "gold": 1}] * 3,
           "gsm": [{"question": "1+1", "answer": "so #### 2"}] * 2,
           "wiki": [{"text": "some text here"}, {"text": "more"}]}
  for name, recs in files.items():
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  spec = ",".join(str(tmp_path / f"{n}.jsonl") for n in files)
  assert [k for k, _, _ in eval_tasks.parse_tasks(spec)] == ["mc", "gen", "ppl"]
  assert eval_tasks.parse_tasks("pref:" + str(tmp_path / "arc.jsonl"))[0][0] == "pref"
  from train_lib import evaluate
  cfg = ml_collections.ConfigDict(dict(eval=dict(tasks=spec, batch_size=4, max_new_tokens=4), data={}))
  res = evaluate.run_tasks(cfg, model, params, _Tok(bos=False))
  assert set(res) >= {"arc/acc", "arc/acc_norm", "gsm/strict_match", "gsm/flexible_extract",
                      "wiki/token_perplexity", "wiki/bits_per_byte"}
  assert res["arc/acc"] in (0.0, 1.0) and res["gsm/strict_match"] == 0.0
  assert res["wiki/token_perplexity"] > 1.0
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    eval_tasks.parse_tasks("mc:missing.jsonl")


# ---- win rate and judges --------------------------------------------------------------------------------
def test_win_rate_with_known_outcomes():
  judge = judges.make_judge("verifier", check=lambda p, t: t == p[::-1])
  prompts = ["abc", "xyz", "123", "pq"]
  policy = ["cba", "zyx", "000", "00"]     # right, right, wrong, wrong
  reference = ["cba", "bad", "bad", "qp"]   # right, wrong, wrong, right
  res = judges.win_rate(judge, prompts, policy, reference)
  assert (res["win_rate/wins"], res["win_rate/ties"], res["win_rate/losses"]) == (1, 2, 1)
  assert res["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)


def test_user_function_judge(tmp_path, monkeypatch):
  (tmp_path / "my_judge.py").write_text("def length(prompt, response):\n  return len(response)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  judge = judges.make_judge("my_judge:length")
  assert judges.win_rate(judge, ["p", "q"], ["long answer", "x"], ["short", "yy"])["win_rate"] == 0.5
  with pytest.raises(ValueError, match="module:function"):
    judges.make_judge("nonsense")


def test_reward_model_judge_scalar_head_and_logprob(tiny, tmp_path):
  model, params = tiny
  d = str(tmp_path / "rm")
  models.save_hf(d, model.config, params)
  tok_dir = tmp_path / "rm"
  export_files.char_tokenizer_json(data.CharTokenizer(), str(tok_dir / "tokenizer.json"))
  (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                             "pad_token": "<pad>"}))
  tok = data.load_tokenizer(d)
  prompts, texts = ["12+3=", "9+9="], ["15", "18"]
  # Without a head: mean log-probability per token of response + eos.
  lp = judges.make_judge("rm:" + d)(prompts, texts)
  for p, t, s in zip(prompts, texts, lp):
    ctx, cont = data.encode_prompt(tok, p), tok.encode(t) + [tok.eos_id]
    seq = np.asarray(ctx + cont)[None]
    logp = np.asarray(jax.nn.log_softmax(model.apply(params, seq[:, :-1]), -1))[0]
    np.testing.assert_allclose(s, logp[np.arange(len(ctx) - 1, seq.shape[1] - 1), cont].mean(), rtol=1e-5)
  # With a head: weight . (final hidden state at the last token) + bias.
  w = np.random.default_rng(0).normal(size=model.config.hidden_size).astype(np.float32)
  np.savez(os.path.join(d, judges.HEAD_FILE), weight=w, bias=np.float32(0.5))
  head = judges.make_judge("rm:" + d)(prompts, texts)
  for p, t, s in zip(prompts, texts, head):
    seq = np.asarray(data.encode_prompt(tok, p) + tok.encode(t) + [tok.eos_id])[None]
    _, h = model.apply(params, seq, return_hidden=True)
    np.testing.assert_allclose(s, float(np.asarray(h)[0, -1] @ w) + 0.5, rtol=1e-4)


# ---- export files ---------------------------------------------------------------------------------------
def test_char_tokenizer_json_has_our_ids(tmp_path):
  from tokenizers import Tokenizer
  tok = data.CharTokenizer()
  path = str(tmp_path / "tokenizer.json")
  export_files.char_tokenizer_json(tok, path)
  hf = Tokenizer.from_file(path)
  text = "123+45=168\nab, c?"
  assert hf.encode(text).ids == tok.encode(text, add_bos=True)
  assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
  assert hf.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_generation_config_lists_chat_stop_tokens(tmp_path):
  from tests import chat_tokenizers
  d = chat_tokenizers.make("gemma", str(tmp_path / "g"), ["hello there"])
  tok = data.load_tokenizer(d)
  gc = export_files.generation_config(tok)
  assert gc["eos_token_id"] == [tok.eos_id, tok.token_to_id("<end_of_turn>")]
  assert gc["bos_token_id"] == tok.bos_id and gc["pad_token_id"] == tok.pad_id
  q = data.load_tokenizer(chat_tokenizers.make("qwen2", str(tmp_path / "q"), ["hello there"]))
  gq = export_files.generation_config(q)
  assert "bos_token_id" not in gq and gq["eos_token_id"] == q.token_to_id("<|im_end|>")


# ---- in-training evaluation -----------------------------------------------------------------------------
@pytest.mark.slow
def test_in_training_eval_runs_task_files_and_win_rate(tmp_path):
  """A smoke DPO + LoRA run on the built-in task: task files and the verifier-judged win rate against the
  base under the adapters are evaluated before and after training."""
  import train_lib
  from configs import dpo
  mc = tmp_path / "digits.jsonl"
  mc.write_text("".join(json.dumps({"question": f"sort {a}:", "choices": [a, "".join(sorted(a))], "gold": 1}) + "\n"
                        for a in ("312", "9051", "77a1")))
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": f"sort {a}:", "chosen": "".join(sorted(a)), "rejected": a}) + "\n"
                           for a in ("312", "9051")))
  config = dpo.get_config("model=tiny,smoke")
  config.eval.tasks = f"{mc},pref:{pairs}"
  config.eval.mc_template = "{question}"   # the CharTokenizer has no capitals
  config.eval.win_rate = True
  config.eval.num_examples = 4
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "wd"))
  for tag in ("before", "after"):
    res = summary[tag]
    assert {"digits/acc", "digits/acc_norm", "pairs/rewards/accuracies", "pairs/ranking_accuracy", "win_rate"} <= set(res)
  assert summary["before"]["win_rate"] == 0.5     # before training the policy is the reference: all ties


def test_eval_task_on_an_hf_checkpoint(tiny, tmp_path):
  """`configs/eval.py` with --config.hf_path: a checkpoint directory evaluated on task files, no run."""
  import train_lib
  from configs import eval as eval_config
  model, params = tiny
  d = str(tmp_path / "ckpt")
  models.save_hf(d, model.config, params)
  export_files.write_tokenizer(ml_collections.ConfigDict({"tokenizer": None}), data.CharTokenizer(), d)
  (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "1+1", "choices": ["2", "3"], "gold": 0}) + "\n")
  config = eval_config.get_config()
  config.hf_path = d
  config.eval.tasks = str(tmp_path / "mc.jsonl")
  config.eval.mc_template = "{question}="
  res = train_lib.run_task(config, str(tmp_path / "ev"))
  assert set(res) == {"mc/acc", "mc/acc_norm", "mc/acc_bytes"}
  assert json.load(open(tmp_path / "ev" / "eval.json")) == res
