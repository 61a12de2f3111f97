"""Preference data (data/_preference.py, data/_pref_synthetic.py): layout, truncation, validation, the
synthetic preference tasks, iteration and resume, file round trips."""
import collections
import json
import re

import numpy as np
import pytest

import data

TOK = data.CharTokenizer()
ids = TOK.encode


def _cfg(kind, **kw):
  cfg = data.default_config()
  cfg.update({"pref_kind": kind, "tokenizer": "char", **kw})
  return cfg


def _encode(record, kind="pairwise", seq_len=32, **kw):
  """The PreferenceExample of one record, under the config's options."""
  cfg = _cfg(kind, **kw)
  fields = data._preference.Fields.from_config(cfg)
  rec, _ = data.record_preference(record, kind, fields, list_size=cfg.list_size,
                                  allow_identical=cfg.allow_identical)
  ex, _ = data.encode_preference(rec, TOK, kind, seq_len=seq_len, max_prompt_len=cfg.max_prompt_len,
                                 max_response_len=cfg.max_response_len, truncate=cfg.truncate,
                                 allow_identical=cfg.allow_identical)
  return ex


def _text(tokens):
  return TOK.decode(tokens, skip_special=False)


def _seq(batch, b, k):
  """(whole sequence, learned targets) of sequence k of row b, read back from the arrays."""
  seg = batch["segment_ids"][b, k] > 0
  learned = batch["targets"][b, k][batch["loss_mask"][b, k] > 0]
  return _text(batch["inputs"][b, k][seg]), _text(learned)


def _answer(task, prompt):
  """The answer, computed here from the prompt text, independently of data._synthetic."""
  body = prompt[len(task) + 1:-1]
  if task == "sort":
    return "".join(sorted(body))
  if task == "reverse":
    return body[::-1]
  a, b = body.split("+")
  return str(int(a) + int(b))


def _hamming(a, b):
  assert len(a) == len(b), (a, b)
  return sum(x != y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# Layout.
# ------------------------------------------------------------------------------------------------

def test_pair_layout_hand_checked():
  # The worked example of the module docstring: "a" = 13, "x" = 36, "y" = 37, bos 1, eos 2.
  assert (ids("a"), ids("x"), ids("y")) == ([13], [36], [37])
  ex = _encode({"prompt": "a", "chosen": "xy", "rejected": "y"}, seq_len=6)
  batch = data.layout([ex], "pairwise", seq_len=6)
  want = {
      "inputs": [[[1, 13, 36, 37, 2, 0], [1, 13, 37, 2, 0, 0]]],
      "targets": [[[13, 36, 37, 2, 0, 0], [13, 37, 2, 0, 0, 0]]],
      "loss_mask": [[[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]],
      "positions": [[[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 0]]],
      "segment_ids": [[[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]],
  }
  for k, v in want.items():
    np.testing.assert_array_equal(batch[k], v, err_msg=k)
  assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["example_mask"], [1.0])
  assert set(batch) == set(want) | {"example_mask"}       # pairs carry no task fields


def test_pairs_through_a_file_keep_chosen_first(tmp_path):
  records = [{"prompt": f"q{i}:", "chosen": "good" * (i + 1), "rejected": "bad"} for i in range(5)]
  data.write_jsonl(tmp_path / "test.jsonl", records)
  cfg = _cfg("pairwise", source="jsonl", path=str(tmp_path / "{split}.jsonl"))
  batches = list(data.get_dataset(cfg, "test", tokenizer=TOK, batch_size=2, seq_len=32))
  assert len(batches) == 3 and all(b["inputs"].shape == (2, 2, 32) for b in batches)
  for i, r in enumerate(records):
    b, row = divmod(i, 2)
    assert _seq(batches[b], row, 0) == ("<bos>" + r["prompt"] + r["chosen"] + "<eos>", r["chosen"] + "<eos>")
    assert _seq(batches[b], row, 1) == ("<bos>" + r["prompt"] + r["rejected"] + "<eos>",
                                        r["rejected"] + "<eos>")
  # 5 = 2 + 2 + 1: the last batch is filled with a copy of the first record, masked out.
  np.testing.assert_array_equal(batches[-1]["example_mask"], [1.0, 0.0])
  np.testing.assert_array_equal(batches[-1]["inputs"][1], batches[0]["inputs"][0])


def test_model_log_probs_of_padded_rows_equal_those_of_each_sequence_alone():
  jax = pytest.importorskip("jax")
  decoder = pytest.importorskip("models._decoder")
  config = pytest.importorskip("models._config")
  model = decoder.Decoder(config.DecoderConfig.tiny(vocab_size=TOK.vocab_size))
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  # 4-digit problems: every sequence alone has 16 tokens, so `apply` compiles twice in all.
  cfg = _cfg("listwise", train_size=3, min_digits=4, max_digits=4, list_size=3)
  batch = next(iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=3, seq_len=20, seed=0)))
  flat = lambda k: batch[k].reshape(9, 20)
  apply = jax.jit(model.apply)
  logits = np.asarray(apply(params, flat("inputs"), flat("positions"), flat("segment_ids")))
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = np.take_along_axis(np.asarray(logp), flat("targets")[..., None], -1)[..., 0]
  ours = (token_logp * flat("loss_mask")).sum(1)
  for row in range(9):
    seq = flat("inputs")[row][flat("segment_ids")[row] > 0]
    prompt_len = len(seq) - int(flat("loss_mask")[row].sum())   # bos + prompt
    alone = np.asarray(jax.nn.log_softmax(apply(params, seq[None])[0], axis=-1))
    want = sum(alone[t - 1, seq[t]] for t in range(prompt_len, len(seq)))
    np.testing.assert_allclose(ours[row], want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Truncation.
# ------------------------------------------------------------------------------------------------

def test_prompt_is_cut_from_the_left_and_responses_from_the_right():
  r = {"prompt": "abcdef", "chosen": "uvwxyz", "rejected": "uv"}
  # max_prompt_len keeps the end of the prompt; seq_len 8 leaves 8 - 1 - 3 = 4 slots for a response:
  # the longer one is cut to 4 and loses its eos, the shorter one fits with its eos.
  ex = _encode(r, seq_len=8, max_prompt_len=3)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>defuvwx", "<bos>defuv<eos>"]
  assert [list(s.weights) for s in ex.seqs] == [[0] * 4 + [1] * 4, [0] * 4 + [1] * 3]
  # Without max_prompt_len the prompt is kept whole and only the responses are cut (3 slots left).
  ex = _encode(r, seq_len=10)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>abcdefuvw", "<bos>abcdefuv<eos>"]
  # max_response_len keeps the start of each response; one of exactly that length keeps its eos.
  ex = _encode(r, max_response_len=2)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>abcdefuv", "<bos>abcdefuv<eos>"]
  ex = _encode({**r, "rejected": "uvw"}, max_response_len=3)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>abcdefuvw", "<bos>abcdefuvw<eos>"]


def test_truncation_failures():
  r = {"prompt": "abcdef", "chosen": "uvwxyz", "rejected": "uvwxab"}
  # Both responses cut to "uvwx": the pair no longer says anything.
  with pytest.raises(data.DataError, match="after truncation") as e:
    _encode(r, seq_len=11)
  assert e.value.reason == "identical_responses"
  assert len(_encode(r, seq_len=11, allow_identical=True).seqs) == 2
  with pytest.raises(data.DataError) as e:
    _encode(r, seq_len=11, truncate=False)
  assert e.value.reason == "too_long"
  assert _text(_encode(r, seq_len=14, truncate=False).seqs[0].tokens) == "<bos>abcdefuvwxyz<eos>"
  with pytest.raises(data.DataError) as e:
    _encode(r, seq_len=7)                 # bos + prompt fill every slot
  assert e.value.reason == "empty_after_truncation"
  ex = _encode({**r, "rejected": "xy"}, seq_len=7, max_prompt_len=4)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>cdefuv", "<bos>cdefxy"]


def test_listwise_entries_are_truncated_alike():
  r = {"prompt": "ab", "responses": ["xyzxyz", "xy", "z"], "scores": [1, 2, 3]}
  ex = _encode(r, "listwise", seq_len=6)
  assert [_text(s.tokens) for s in ex.seqs] == ["<bos>abxyz", "<bos>abxy<eos>", "<bos>abz<eos>"]


# ------------------------------------------------------------------------------------------------
# Lists, ranks, unpaired, reference log-probs.
# ------------------------------------------------------------------------------------------------

def test_listwise_padding_scores_and_ranks():
  a = _encode({"prompt": "p", "responses": ["x", "yy", "z"], "ranks": [2, 1, 2]}, "listwise")
  b = _encode({"prompt": "q", "responses": ["u", "v"], "scores": [0.5, -1.5]}, "listwise")
  batch = data.layout([a, b], "listwise", seq_len=8, list_size=4)
  assert batch["inputs"].shape == (2, 4, 8)
  # Ranks 2, 1, 2 (1 = best): score = 1 - rank, ties kept.
  np.testing.assert_array_equal(batch["scores"], [[-1, 0, -1, 0], [0.5, -1.5, 0, 0]])
  np.testing.assert_array_equal(batch["list_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
  for row, k in [(0, 3), (1, 2), (1, 3)]:           # padding entries: empty rows
    assert not batch["segment_ids"][row, k].any() and not batch["loss_mask"][row, k].any()
    assert not batch["inputs"][row, k].any()
  assert _seq(batch, 0, 1) == ("<bos>pyy<eos>", "yy<eos>") and _seq(batch, 1, 1) == ("<bos>qv<eos>", "v<eos>")
  assert batch["scores"].dtype == np.float32 and batch["list_mask"].dtype == np.float32


def test_list_entries_without_response_or_score_are_dropped_and_counted(tmp_path):
  records = [{"prompt": "p", "responses": ["a", "", "b", "c", None], "scores": [3, 2, None, 1, 0]},
             {"prompt": "q", "responses": ["a", "b"], "scores": [1, float("nan")]},   # 1 left: invalid
             {"prompt": "r", "responses": ["a", "b"], "scores": [1, 2]}]
  with open(tmp_path / "train.jsonl", "w") as f:   # NaN is not JSON: write it as Python's json does
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  cfg = _cfg("listwise", source="jsonl", path=str(tmp_path / "{split}.jsonl"), skip_invalid=True)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=8, train=False)
  assert len(ds) == 2 and ds.report.counts == {"too_few_responses": 1}
  # Only the kept records' entries count: "" and None responses, and the None score.
  assert ds.report.dropped == {"empty_response": 2, "missing_score": 1}
  assert "list entries dropped: empty_response=2, missing_score=1" in ds.report.summary()
  batch = next(iter(ds))
  np.testing.assert_array_equal(batch["scores"][0], [3, 1, 0, 0])
  assert [_seq(batch, 0, k)[1] for k in range(2)] == ["a<eos>", "c<eos>"]


def test_unpaired_labels_and_kl_pairs():
  recs = [{"prompt": "long=", "completion": "a", "label": True},
          {"prompt": "p=", "completion": "bbbb", "label": False},
          {"prompt": "q=", "completion": "cc", "label": 1}]
  exs = [_encode(r, "unpaired", seq_len=8) for r in recs]
  batch = data.layout(exs, "unpaired", seq_len=8)
  assert batch["inputs"].shape == (3, 2, 8) and batch["label"].dtype == bool
  np.testing.assert_array_equal(batch["label"], [True, False, True])
  for b, r in enumerate(recs):
    assert _seq(batch, b, 0) == (f"<bos>{r['prompt']}{r['completion']}<eos>", r["completion"] + "<eos>")
  # Index 1: the row's prompt with the previous row's completion (row 0 takes the last row's), cut
  # from the right to fit (row 0 loses its eos).
  assert _seq(batch, 0, 1) == ("<bos>long=cc", "cc")
  assert _seq(batch, 1, 1) == ("<bos>p=a<eos>", "a<eos>")
  assert _seq(batch, 2, 1) == ("<bos>q=bbbb<eos>", "bbbb<eos>")
  assert data.layout(exs, "unpaired", seq_len=8, unpaired_kl=False)["inputs"].shape == (3, 1, 8)
  assert _encode({"prompt": "p", "completion": "x", "label": 0}, "unpaired").label is False


def test_precomputed_reference_log_probs(tmp_path):
  records = [{"prompt": "p", "chosen": "a", "rejected": "b", "ref": [-1.5, -2.5],
              "ref_c": -1.0, "ref_r": -3.0}]
  data.write_jsonl(tmp_path / "train.jsonl", records)
  make = lambda **kw: next(iter(data.get_dataset(
      _cfg("pairwise", source="jsonl", path=str(tmp_path / "{split}.jsonl"), **kw), "train", tokenizer=TOK,
      batch_size=1, seq_len=8)))
  np.testing.assert_array_equal(make(ref_logps_field="ref")["ref_logps"], [[-1.5, -2.5]])
  np.testing.assert_array_equal(make(ref_logps_field="ref_c, ref_r")["ref_logps"], [[-1.0, -3.0]])
  assert "ref_logps" not in make()
  # Listwise: aligned with the entries that stay.
  ex = _encode({"prompt": "p", "responses": ["a", "", "c"], "scores": [1, 2, 3], "ref": [-1, -2, -3]},
               "listwise", ref_logps_field="ref")
  np.testing.assert_array_equal(data.layout([ex], "listwise", seq_len=8)["ref_logps"], [[-1, -3, 0, 0]])
  with pytest.raises(ValueError, match="unpaired_kl=False"):
    data.get_dataset(_cfg("unpaired", ref_logps_field="ref"), "train", tokenizer=TOK, batch_size=2,
                     seq_len=8)


def test_chat_records():
  template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
  prompt = [{"role": "user", "content": "hi"}]
  forms = ["yes", {"role": "assistant", "content": "yes"}, [{"role": "assistant", "content": "yes"}]]
  render = data._preference._renderer(_cfg("pairwise", chat_template=template), TOK)
  for chosen in forms:
    rec, _ = data.record_preference({"prompt": prompt, "chosen": chosen, "rejected": "no"}, "pairwise",
                                    render=render)
    assert rec.prompt == "<user>hi<assistant>" and rec.responses == ("yes", "no")
  with pytest.raises(data.DataError) as e:
    data.record_preference({"prompt": prompt, "chosen": forms[2] * 2, "rejected": "no"}, "pairwise",
                           render=render)
  assert e.value.reason == "bad_messages"
  with pytest.raises(data.DataError) as e:
    data.record_preference({"prompt": prompt, "chosen": "", "rejected": "no"}, "pairwise", render=render)
  assert e.value.reason == "empty_response"
  no_template = data._preference._renderer(_cfg("pairwise"), TOK)
  with pytest.raises(ValueError, match="no chat template"):
    data.record_preference({"prompt": prompt, "chosen": "a", "rejected": "b"}, "pairwise", render=no_template)


# ------------------------------------------------------------------------------------------------
# Validation: each malformed kind, located; skip mode counts them.
# ------------------------------------------------------------------------------------------------

P = {"prompt": "p", "chosen": "a", "rejected": "b"}
U = {"prompt": "p", "completion": "a", "label": True}
L = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}
MALFORMED = [
    ("pairwise", {"prompt": "p", "chosen": "a"}, "missing_field", {}),
    ("pairwise", {**P, "chosen": 3}, "wrong_type", {}),
    ("pairwise", {**P, "prompt": 3}, "wrong_type", {}),
    ("pairwise", {**P, "chosen": ""}, "empty_response", {}),
    ("pairwise", {**P, "rejected": "a"}, "identical_responses", {}),
    ("pairwise", {**P, "chosen": "a" * 20}, "too_long", {"truncate": False}),
    ("pairwise", {**P, "prompt": "p" * 20}, "empty_after_truncation", {}),
    ("pairwise", {**P, "chosen": "A"}, "unencodable", {}),
    ("pairwise", {**P, "ref": [-1.0]}, "bad_ref_logps", {"ref_logps_field": "ref"}),
    ("pairwise", {**P, "ref": [-1.0, "x"]}, "bad_ref_logps", {"ref_logps_field": "ref"}),
    ("unpaired", {**U, "label": "yes"}, "bad_label", {}),
    ("unpaired", {**U, "label": 2}, "bad_label", {}),
    ("unpaired", {"prompt": "p", "completion": "a"}, "missing_field", {}),
    ("unpaired", {**U, "completion": ""}, "empty_response", {}),
    ("listwise", {**L, "scores": [1, 0, 2]}, "length_mismatch", {}),
    ("listwise", {**L, "scores": [1, "high"]}, "bad_score", {}),
    ("listwise", {**L, "scores": [1, True]}, "bad_score", {}),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, "bad_score", {}),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "ranks": [1.5, 1]}, "bad_score", {}),
    ("listwise", {**L, "responses": ["a", ""]}, "too_few_responses", {}),
    ("listwise", {**L, "responses": ["a"], "scores": [1]}, "too_few_responses", {}),
    ("listwise", {"prompt": "p", "responses": list("abcde"), "scores": [1] * 5}, "list_too_long", {}),
    ("listwise", {**L, "responses": "ab"}, "wrong_type", {}),
    ("listwise", {**L, "scores": {"a": 1}}, "wrong_type", {}),
    ("listwise", {"prompt": "p", "responses": ["a", "b"]}, "missing_field", {}),
    ("listwise", [1, 2], "wrong_type", {}),
]
GOOD = {"pairwise": P, "unpaired": U, "listwise": L}


@pytest.mark.parametrize("kind,record,reason,opts", MALFORMED,
                         ids=[f"{m[0]}-{m[2]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_record_fails_with_file_line_and_reason(tmp_path, kind, record, reason, opts):
  path = tmp_path / "train.jsonl"
  good = {**GOOD[kind], **({"ref": [-1.0, -2.0]} if "ref_logps_field" in opts else {})}
  # Line 1 good, line 2 blank, line 3 the bad record: the blank line still counts.
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
  cfg = _cfg(kind, source="jsonl", path=str(path), **opts)
  with pytest.raises(data.DataError) as e:
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=12)
  assert (e.value.file, e.value.line, e.value.reason) == (str(path), 3, reason)
  assert str(e.value).startswith(f"{path}, line 3: {reason}: ")
  ds = data.get_dataset(_cfg(kind, source="jsonl", path=str(path), skip_invalid=True, **opts), "train",
                        tokenizer=TOK, batch_size=2, seq_len=12)
  assert len(ds) == 1 and ds.report.counts == {reason: 1} and ds.report.total == 2
  assert f"line 3: {reason}" in ds.report.summary()


def test_bad_json_and_skip_counts_per_reason(tmp_path):
  path = tmp_path / "train.jsonl"
  lines = [json.dumps(P), "{not json", json.dumps({**P, "rejected": "a"}), json.dumps(P),
           json.dumps({**P, "chosen": ""}), json.dumps({**P, "rejected": "a"})]
  path.write_text("\n".join(lines) + "\n")
  cfg = _cfg("pairwise", source="jsonl", path=str(path))
  with pytest.raises(data.DataError) as e:
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=12)
  assert (e.value.line, e.value.reason) == (2, "bad_json")
  cfg.skip_invalid = True
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=12)
  assert len(ds) == 2 and ds.report.total == 6
  assert ds.report.counts == {"bad_json": 1, "identical_responses": 2, "empty_response": 1}
  assert "line 3" in ds.report.first["identical_responses"]
  cfg.allow_identical = True
  assert len(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=12)) == 4


def test_config_is_validated():
  with pytest.raises(ValueError, match="valid: None .*pairwise, unpaired, listwise"):
    data.get_dataset(_cfg("pairs"), "train", tokenizer=TOK, batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match="SFT option"):
    data.get_dataset(_cfg("pairwise", messages_field="messages"), "train", tokenizer=TOK, batch_size=2,
                     seq_len=16)
  with pytest.raises(ValueError, match="list_size"):
    data.get_dataset(_cfg("listwise", list_size=1), "train", tokenizer=TOK, batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match="batch_size must be >= 2"):
    data.get_dataset(_cfg("unpaired", train_size=4), "train", tokenizer=TOK, batch_size=1, seq_len=16)
  with pytest.raises(ValueError, match="names 3 fields"):
    data.get_dataset(_cfg("pairwise", ref_logps_field="a,b,c"), "train", tokenizer=TOK, batch_size=2,
                     seq_len=16)


# ------------------------------------------------------------------------------------------------
# Synthetic preference tasks.
# ------------------------------------------------------------------------------------------------

def test_corruptions_have_exactly_the_asked_wrong_digits():
  rng = np.random.default_rng(0)
  for answer in ["11345", "4690", "0012", "7", "1000"]:
    for e in range(1, len(answer) + 1):
      for _ in range(20):
        bad = data.corrupt(answer, e, rng)
        assert len(bad) == len(answer) and _hamming(answer, bad) == e and bad.isdigit()
        assert answer[0] == "0" or len(answer) == 1 or bad[0] != "0"   # no leading zero added
  with pytest.raises(ValueError):
    data.corrupt("123", 4, rng)


@pytest.mark.parametrize("task", ["sort", "reverse", "add"])
def test_synthetic_pairs_and_unpaired_verify(task):
  t = data.get_task(task)
  for r in data.generate_preference(task, "train", 200, "pairwise", seed=1):
    answer = _answer(task, r["prompt"])
    assert r["chosen"] == answer and t.check(r["prompt"], r["chosen"])
    assert not t.check(r["prompt"], r["rejected"]) and 1 <= _hamming(answer, r["rejected"]) <= len(answer)
  recs = data.generate_preference(task, "train", 400, "unpaired", seed=1)
  for r in recs:
    answer = _answer(task, r["prompt"])
    assert r["label"] == t.check(r["prompt"], r["completion"]) == (r["completion"] == answer)
  assert 160 <= sum(r["label"] for r in recs) <= 240     # desirable_fraction 0.5 (binomial, 400 draws)
  few = data.generate_preference(task, "train", 400, "unpaired", seed=1, desirable_fraction=0.1)
  assert sum(r["label"] for r in few) <= 70


@pytest.mark.parametrize("task", ["sort", "add"])
def test_synthetic_lists_are_graded_by_wrong_digits(task):
  t = data.get_task(task)
  recs = data.generate_preference(task, "train", 300, "listwise", seed=2, list_size=5)
  ties = first_place = 0
  for r in recs:
    answer = _answer(task, r["prompt"])
    assert len(r["responses"]) == len(r["scores"]) == 5
    # The score is minus the number of wrong digits: more corruption, lower score.
    assert r["scores"] == [-_hamming(answer, x) for x in r["responses"]]
    ok = [t.check(r["prompt"], x) for x in r["responses"]]
    assert sum(ok) == 1 and r["scores"][ok.index(True)] == 0 and sorted(r["scores"])[-2] < 0
    if len(answer) >= 3:
      assert len(set(r["responses"])) == 5
    ties += len(set(r["scores"])) < 5
    first_place += ok[0]
  assert ties > 0                                   # ties happen (and the losses must handle them)
  assert 30 <= first_place <= 100                   # the answer's place is shuffled (about 1 in 5)


def test_synthetic_preference_splits_are_disjoint_and_prefix_stable():
  train = data.generate_preference("sort", "train", 500, "pairwise", seed=0, max_digits=4)
  test = data.generate_preference("sort", "test", 100, "pairwise", seed=0, max_digits=4)
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
  sft = data.generate("sort", "test", 100, max_digits=4)
  assert [r["prompt"] for r in test] == [r["prompt"] for r in sft]     # the SFT split's problems
  assert data.generate_preference("sort", "test", 30, "pairwise", seed=0, max_digits=4) == test[:30]
  assert data.generate_preference("sort", "test", 100, "pairwise", seed=1, max_digits=4) != test


def test_builtin_preference_dataset_and_eval_examples():
  cfg = _cfg("pairwise", tokenizer=None, train_size=40, max_digits=4)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=8, seq_len=16)
  batch = next(iter(ds))
  t = data.get_task("sort")
  for b in range(8):
    (chosen_seq, chosen), (_, rejected) = _seq(batch, b, 0), _seq(batch, b, 1)
    prompt = chosen_seq[len("<bos>"):chosen_seq.index("=") + 1]
    assert t.check(prompt, chosen[:-len("<eos>")]) and not t.check(prompt, rejected[:-len("<eos>")])
  records = data.preference_eval_examples(cfg, "test", 20)
  assert len(records) == 20 and all(isinstance(r, data.PreferenceRecord) for r in records)
  assert records[:5] == data.preference_eval_examples(cfg, "test", 5)
  assert all(t.check(r.prompt, r.responses[0]) and not t.check(r.prompt, r.responses[1]) for r in records)
  train_prompts = {_text(e.seqs[0].tokens).split("=")[0][len("<bos>"):] + "=" for e in ds.examples}
  assert not train_prompts & {r.prompt for r in records}
  held = data.preference_batch(records[:4], cfg, tokenizer=TOK, seq_len=16)
  assert held["inputs"].shape == (4, 2, 16)
  assert [_seq(held, b, 0)[1] for b in range(4)] == [r.responses[0] + "<eos>" for r in records[:4]]
  # Generation eval on a preference config: the answers of the same held-out problems.
  pairs, check = data.eval_examples(cfg, "test", 20)
  assert [p for p, _ in pairs] == [r.prompt for r in records] and all(check(p, a) for p, a in pairs)


# ------------------------------------------------------------------------------------------------
# Iteration and resume.
# ------------------------------------------------------------------------------------------------

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["pairwise", "unpaired", "listwise"])
def test_iteration_is_deterministic_and_resumes_exactly(kind):
  cfg = _cfg(kind, tokenizer=None, train_size=30, max_digits=4)
  make = lambda seed=3: iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=4, seq_len=16,
                                              seed=seed))
  full = _take(make(), 20)                          # 80 examples: more than two epochs of 30
  assert _same(full, _take(make(), 20)) and not _same(full, _take(make(4), 20))
  it = make()
  _take(it, 9)
  state = json.loads(json.dumps(it.get_state()))
  assert state["epoch"] == 1 and state["position"] == 6
  resumed = make()
  resumed.set_state(state)
  assert _same(_take(resumed, 11), full[9:])


def test_each_epoch_visits_every_example_once():
  cfg = _cfg("listwise", tokenizer=None, train_size=12, max_digits=4, list_size=3)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=4, seq_len=16, seed=0)
  seen = [tuple(map(tuple, b["inputs"][r])) for b in _take(iter(ds), 6) for r in range(4)]
  key = lambda e: tuple(tuple(np.pad(s.tokens, (0, 16 - len(s.tokens)))) for s in e.seqs)
  want = [key(e) for e in ds.examples]
  assert sorted(seen[:12]) == sorted(want) and sorted(seen[12:]) == sorted(want)
  assert seen[:12] != seen[12:]                     # reshuffled per epoch


def test_eval_is_one_ordered_pass():
  cfg = _cfg("listwise", tokenizer=None, eval_size=10, max_digits=4, list_size=3)
  ds = data.get_dataset(cfg, "test", tokenizer=TOK, batch_size=4, seq_len=16)
  first = list(ds)
  assert len(first) == 3 and _same(first, list(ds))
  np.testing.assert_array_equal(first[-1]["example_mask"], [1, 1, 0, 0])
  records = data.generate_preference("sort", "test", 10, "listwise", list_size=3, max_digits=4)
  got = [_seq(b, r, k)[1] for b in first for r in range(4) for k in range(3)][:30]
  assert got == [x + "<eos>" for rec in records for x in rec["responses"]]
  assert [list(b["scores"][r]) for b in first for r in range(4)][:10] == [rec["scores"] for rec in records]


def test_process_shards_split_the_global_batch_and_kl_pairs_cross_them():
  cfg = _cfg("unpaired", tokenizer=None, train_size=20, max_digits=4)
  mk = lambda i, n: iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=4, seq_len=16, seed=0,
                                          process_index=i, process_count=n))
  full, p0, p1 = _take(mk(0, 1), 3), _take(mk(0, 2), 3), _take(mk(1, 2), 3)
  for f, a, b in zip(full, p0, p1):
    assert f.keys() == a.keys() == b.keys()
    for k in f:
      np.testing.assert_array_equal(f[k], np.concatenate([a[k], b[k]]))
  # Row 2 (process 1's first) pairs its prompt with row 1's completion, which process 0 holds.
  assert _seq(p1[0], 0, 1)[1] == _seq(p0[0], 1, 0)[1]


# ------------------------------------------------------------------------------------------------
# File round trips.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pairwise", "unpaired", "listwise"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "array_record"])
def test_file_round_trip_gives_the_builtin_batches(tmp_path, kind, fmt):
  builtin = _cfg(kind, tokenizer=None, train_size=24, eval_size=9, max_digits=4)
  for split, n in (("train", 24), ("test", 9)):
    records = data.generate_preference("sort", split, n, kind, max_digits=4)
    path = tmp_path / f"{split}.{fmt}"
    if fmt == "jsonl":
      data.write_jsonl(path, records)
    elif fmt == "array_record":
      data.write_array_record(path, records)
    else:
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      pq.write_table(pa.Table.from_pylist(records), path)
  files = _cfg(kind, source=fmt, path=str(tmp_path / f"{{split}}.{fmt}"))
  for split, train in (("train", True), ("test", False)):
    a = data.get_dataset(builtin, split, tokenizer=TOK, batch_size=4, seq_len=16, seed=1)
    b = data.get_dataset(files, split, tokenizer=TOK, batch_size=4, seq_len=16, seed=1)
    assert a.train == b.train == train
    n = 7 if train else 3
    assert _same(_take(iter(a), n), _take(iter(b), n))
  assert data.preference_eval_examples(files, "test", 4) == data.preference_eval_examples(builtin, "test", 4)


def test_parquet_listwise_with_ranks_and_custom_fields(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = [{"q": "sort:21=", "outs": ["12", "21", "22"], "rank": [1, 3, 2]},
          {"q": "sort:31=", "outs": ["13", "31"], "rank": [1, 2]}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
  cfg = _cfg("listwise", source="parquet", path=str(tmp_path / "{split}.parquet"), prompt_field="q",
             responses_field="outs", ranks_field="rank", list_size=3)
  batch = next(iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=12, train=False)))
  np.testing.assert_array_equal(batch["scores"], [[0, -2, -1], [0, -1, 0]])
  np.testing.assert_array_equal(batch["list_mask"], [[1, 1, 1], [1, 1, 0]])
  assert _seq(batch, 0, 2) == ("<bos>sort:21=22<eos>", "22<eos>")
  pairs, check = data.eval_examples(cfg, "train")
  assert pairs == [("sort:21=", "12"), ("sort:31=", "13")] and check("sort:21=", "12")
  assert not check("sort:21=", "22")
