"""Synthetic tasks, SFT examples, packing and the resumable iterator (data/)."""
import collections
import json
import re

import numpy as np
import pytest

import data

TOK = data.CharTokenizer()


def _docs(batch):
  """(tokens, learned targets) of every document in a batch, read back from the five arrays."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      out.append((tuple(batch["inputs"][r, idx]), tuple(batch["targets"][r, idx][batch["loss_mask"][r, idx] > 0])))
  return out


# ------------------------------------------------------------------------------------------------
# Synthetic tasks.
# ------------------------------------------------------------------------------------------------

def _answer(task, prompt):
  """The answer, computed here from the prompt text, independently of data._synthetic."""
  body = prompt[len(task) + 1:-1]
  if task == "sort":
    return "".join(sorted(body))
  if task == "reverse":
    return body[::-1]
  a, b = body.split("+")
  return str(int(a) + int(b))


def _corruptions(response):
  out = {response + "0", response[:-1], "", " " + response, str(int(response) + 1).zfill(len(response))}
  for i in range(len(response) - 1):
    if response[i] != response[i + 1]:
      out.add(response[:i] + response[i + 1] + response[i] + response[i + 2:])
  out.discard(response)
  return out


@pytest.mark.parametrize("task", ["sort", "reverse", "add"])
def test_verifier_accepts_answers_and_rejects_corruptions(task):
  t = data.get_task(task)
  records = data.generate(task, "train", 300, seed=3)
  for r in records:
    assert r["response"] == _answer(task, r["prompt"])
    assert t.check(r["prompt"], r["response"])
    for bad in _corruptions(r["response"]):
      assert not t.check(r["prompt"], bad), (r, bad)
  with pytest.raises(ValueError, match="not a"):
    t.check("nonsense", "1")


def test_known_answers():
  assert data.get_task("sort").check("sort:31415=", "11345")
  assert data.get_task("reverse").check("reverse:31415=", "51413")
  assert data.get_task("add").check("add:123+4567=", "4690")
  assert data.get_task("add").check("add:999+1=", "1000")
  assert not data.get_task("add").check("add:999+1=", "999")


@pytest.mark.parametrize("task", ["sort", "reverse", "add"])
def test_splits_are_disjoint_whatever_the_seed(task):
  train = data.generate(task, "train", 3000, seed=0, max_digits=4)
  test = data.generate(task, "test", 300, seed=0, max_digits=4)
  other_train = data.generate(task, "train", 3000, seed=7, max_digits=4)
  train_p = {r["prompt"] for r in train} | {r["prompt"] for r in other_train}
  test_p = {r["prompt"] for r in test}
  assert len({r["prompt"] for r in train}) == 3000 and len(test_p) == 300   # distinct within a split
  assert not train_p & test_p


def test_split_fraction_and_digit_range():
  # Over all 3-digit sort problems, about eval_fraction of them are held out (binomial, 1000 draws).
  held = sum(data.is_held_out("sort", f"{i:03d}", 0.1) for i in range(1000))
  assert 60 <= held <= 140
  lens = collections.Counter(len(r["response"]) for r in data.generate("sort", "train", 2000, min_digits=2,
                                                                        max_digits=5))
  assert set(lens) == {2, 3, 4, 5}
  for r in data.generate("add", "train", 500, min_digits=2, max_digits=3):
    a, b = re.fullmatch(r"add:(\d+)\+(\d+)=", r["prompt"]).groups()
    assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3 and a[0] != "0" and b[0] != "0"


def test_generation_is_seeded_and_prefix_stable():
  a = data.generate("sort", "train", 200, seed=1)
  assert a == data.generate("sort", "train", 200, seed=1)
  assert a[:50] == data.generate("sort", "train", 50, seed=1)
  assert a != data.generate("sort", "train", 200, seed=2)


def test_too_small_problem_space_raises():
  # 1-digit sort has 10 problems in all, so 50 distinct training problems do not exist.
  with pytest.raises(ValueError, match="distinct"):
    data.generate("sort", "train", 50, min_digits=1, max_digits=1)


def test_char_tokenizer():
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
  ids = TOK.encode("sort:31415=", add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 13
  assert len(set(ids[1:-1])) == len(set("sort:31415="))
  assert max(TOK.encode(TOK.chars)) == TOK.vocab_size - 1
  assert TOK.decode(ids) == "sort:31415="
  assert TOK.decode(ids, skip_special=False) == "<bos>sort:31415=<eos>"
  with pytest.raises(ValueError, match="not in the CharTokenizer"):
    TOK.encode("SORT")


# ------------------------------------------------------------------------------------------------
# SFT examples and truncation.
# ------------------------------------------------------------------------------------------------

def test_loss_only_on_response_and_eos():
  ex = data.encode_sft("sort:31=", "13", TOK, seq_len=32)
  assert list(ex.tokens) == [1] + TOK.encode("sort:31=") + TOK.encode("13") + [2]
  assert list(ex.weights) == [0.0] * 9 + [1.0, 1.0, 1.0]


def test_truncation_rules():
  p, r = "abcdef", "uvwxyz"
  enc = lambda **kw: data.encode_sft(p, r, TOK, **{"seq_len": 64, **kw})
  # The prompt keeps its end; the response keeps its start and, once cut, loses its eos.
  ex = enc(max_prompt_len=2)
  assert TOK.decode(ex.tokens) == "ef" + r and ex.tokens[-1] == TOK.eos_id
  ex = enc(max_response_len=3)
  assert TOK.decode(ex.tokens) == p + "uvw" and ex.tokens[-1] != TOK.eos_id
  assert list(ex.weights) == [0] * 7 + [1] * 3
  ex = enc(max_response_len=6)                       # exactly fits: not cut, eos kept
  assert ex.tokens[-1] == TOK.eos_id
  # Fitting seq_len cuts the response from the right: bos + 6 + 4 = 11 tokens.
  ex = enc(seq_len=11)
  assert len(ex.tokens) == 11 and TOK.decode(ex.tokens) == p + "uvwx" and ex.tokens[-1] != TOK.eos_id
  assert len(enc(seq_len=14).tokens) == 14 and enc(seq_len=14).tokens[-1] == TOK.eos_id
  with pytest.raises(data.DataError, match="too_long") as e:
    enc(seq_len=11, truncate=False)
  assert e.value.reason == "too_long"
  with pytest.raises(data.DataError) as e:
    enc(seq_len=7)                                   # bos + prompt fill all 7 slots
  assert e.value.reason == "empty_after_truncation"
  assert len(enc(seq_len=7, max_prompt_len=4).tokens) == 7   # a shorter prompt rescues it
  with pytest.raises(data.DataError) as e:
    data.encode_sft(p, "", TOK, seq_len=64)
  assert e.value.reason == "empty_response"


# ------------------------------------------------------------------------------------------------
# Packing.
# ------------------------------------------------------------------------------------------------

def _ex(tokens, n_prompt):
  """An example from raw ids: bos, then `n_prompt` prompt ids, then response ids and eos."""
  tokens = np.asarray(tokens, np.int32)
  w = np.zeros(len(tokens), np.float32)
  w[1 + n_prompt:] = 1
  return data.Example(tokens, w)


A, B, C, D = _ex([1, 5, 6, 2], 1), _ex([1, 7, 8, 9, 2], 1), _ex([1, 3, 4, 2], 1), _ex([1, 3, 3, 3, 2], 1)


def test_pack_first_fit_hand_checked():
  batch, used = data.pack([A, B, C, D], rows=2, seq_len=8)
  assert used == 3
  want = {
      "inputs": [[1, 5, 6, 2, 1, 3, 4, 2], [1, 7, 8, 9, 2, 0, 0, 0]],
      "targets": [[5, 6, 2, 0, 3, 4, 2, 0], [7, 8, 9, 2, 0, 0, 0, 0]],
      "loss_mask": [[0, 1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]],
      "positions": [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 0, 0]],
      "segment_ids": [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0, 0]],
  }
  for k, v in want.items():
    np.testing.assert_array_equal(batch[k], v, err_msg=k)
  assert batch["loss_mask"].dtype == np.float32 and all(batch[k].dtype == np.int32 for k in want if k != "loss_mask")


def test_pack_greedy_and_none():
  batch, used = data.pack([A, B, C, D], rows=2, seq_len=8, mode="greedy")
  assert used == 2
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  batch, used = data.pack([A, C, B], rows=3, seq_len=8, mode="greedy")   # A and C share row 0
  assert used == 3
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3])
  batch, used = data.pack([A, C, B, D], rows=3, seq_len=8, mode="none")
  assert used == 3
  np.testing.assert_array_equal(batch["segment_ids"].max(1), [1, 1, 1])
  np.testing.assert_array_equal(batch["inputs"][1], [1, 3, 4, 2, 0, 0, 0, 0])


def test_pack_random_invariants():
  rng = np.random.default_rng(0)
  exs = [_ex([1] + list(rng.integers(3, 50, size=n - 2)) + [2], int(rng.integers(0, n - 2)))
         for n in rng.integers(3, 17, size=200)]
  batch, used = data.pack(exs, rows=6, seq_len=32)
  assert 0 < used < 200
  seen = []
  for r in range(6):
    seg, pos = batch["segment_ids"][r], batch["positions"][r]
    for t in range(32):
      last_of_doc = seg[t] == 0 or t == 31 or seg[t + 1] != seg[t]
      if last_of_doc:   # no target crosses into the next document or padding
        assert batch["loss_mask"][r, t] == 0 and batch["targets"][r, t] == 0
      else:
        assert batch["targets"][r, t] == batch["inputs"][r, t + 1] and pos[t + 1] == pos[t] + 1
      if seg[t] and (t == 0 or seg[t - 1] != seg[t]):
        assert pos[t] == 0
    assert (np.diff(seg[seg > 0]) >= 0).all()
    seen += _docs({k: v[r:r + 1] for k, v in batch.items()})
  # Documents come out whole, with targets learned exactly where the example's weights say.
  want = [(tuple(e.tokens), tuple(e.tokens[1:][e.weights[1:] > 0])) for e in exs[:used]]
  assert sorted(seen) == sorted(want)


def test_packed_documents_give_the_logits_of_each_document_alone():
  jax = pytest.importorskip("jax")
  decoder = pytest.importorskip("models._decoder")
  config = pytest.importorskip("models._config")
  model = decoder.Decoder(config.DecoderConfig.tiny(vocab_size=TOK.vocab_size))
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  apply = jax.jit(model.apply)
  # 16 tokens each: one length, so the documents alone compile once.
  exs = [data.encode_sft(r["prompt"], r["response"], TOK, seq_len=64)
         for r in data.generate("sort", "train", 6, seed=0, min_digits=4, max_digits=4)]
  batch, used = data.pack(exs, rows=2, seq_len=64)
  assert used == 6 and batch["segment_ids"].max() >= 2
  logits = np.asarray(apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]))
  for r in range(2):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      alone = np.asarray(apply(params, batch["inputs"][r:r + 1, idx]))[0]
      np.testing.assert_allclose(logits[r, idx], alone, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Iterator: shuffling, epochs, resume.
# ------------------------------------------------------------------------------------------------

def _cfg(**kw):
  cfg = data.default_config()
  cfg.update({"train_size": 60, "max_digits": 4, **kw})
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in data.FIELDS) for x, y in zip(a, b))


def test_batches_are_deterministic_and_seeded():
  mk = lambda seed: iter(data.get_dataset(_cfg(), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=seed))
  a, b, c = _take(mk(0), 6), _take(mk(0), 6), _take(mk(1), 6)
  assert _same(a, b) and not _same(a, c)
  assert all(x["inputs"].shape == (4, 32) for x in a)


def test_each_epoch_visits_every_example_once():
  ds = data.get_dataset(_cfg(), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=0)
  it, docs = iter(ds), []
  while it.get_state()["epoch"] == 0:
    docs += [d[0] for d in _docs(next(it))]
  epoch1 = it.get_state()["position"]
  want = [tuple(e.tokens) for e in ds.examples]
  # The first epoch in full, then the first `epoch1` examples of the second epoch's order.
  assert sorted(docs) == sorted(want + [want[i] for i in ds.order(1)[:epoch1]])
  assert not np.array_equal(ds.order(0), ds.order(1))


@pytest.mark.parametrize("packing", ["first_fit", "greedy", "none"])
def test_resume_mid_epoch_is_exact(packing):
  make = lambda: data.get_dataset(_cfg(packing=packing), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=5)
  it = iter(make())
  full = _take(it, 30)                           # spans several epochs of 60 examples
  it = iter(make())
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  assert state["position"] > 0 and state["epoch"] == 0
  resumed = iter(make())
  resumed.set_state(state)
  assert _same(_take(resumed, 23), full[7:])


def test_resume_rejects_another_dataset():
  it = iter(data.get_dataset(_cfg(), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=0))
  next(it)
  other = iter(data.get_dataset(_cfg(train_size=61), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=0))
  with pytest.raises(ValueError, match="another dataset"):
    other.set_state(it.get_state())


def test_eval_is_one_ordered_pass_and_repeatable():
  cfg = _cfg(eval_size=50)
  ds = data.get_dataset(cfg, "test", tokenizer=TOK, batch_size=4, seq_len=32)
  first = list(ds)
  assert _same(first, list(ds))
  docs = [d[0] for b in first for d in _docs(b)]
  want = [tuple(TOK.encode(r["prompt"] + r["response"], add_bos=True, add_eos=True))
          for r in data.generate("sort", "test", 50, max_digits=4)]
  assert sorted(docs) == sorted(want)
  padded = list(data.get_dataset(_cfg(eval_size=50, packing="none"), "test", tokenizer=TOK, batch_size=4,
                                 seq_len=32))
  assert len(padded) == 13                          # 50 = 12 * 4 + 2: the last batch has 2 empty rows
  np.testing.assert_array_equal(padded[-1]["segment_ids"].max(1), [1, 1, 0, 0])
  in_order = [tuple(row[seg > 0]) for b in padded for row, seg in zip(b["inputs"], b["segment_ids"]) if seg.any()]
  assert in_order == want                           # eval reads the records in their order


def test_process_shards_split_the_global_batch():
  mk = lambda i, n: iter(data.get_dataset(_cfg(), "train", tokenizer=TOK, batch_size=4, seq_len=32, seed=0,
                                          process_index=i, process_count=n))
  full, p0, p1 = _take(mk(0, 1), 3), _take(mk(0, 2), 3), _take(mk(1, 2), 3)
  for f, a, b in zip(full, p0, p1):
    for k in data.FIELDS:
      np.testing.assert_array_equal(f[k], np.concatenate([a[k], b[k]]))


# ------------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------------

def test_config_is_validated():
  with pytest.raises(ValueError, match="unknown data config keys.*valid: .*train_size"):
    data.get_dataset({"trian_size": 5}, "train", tokenizer=TOK, batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match="valid: sort, reverse, add"):
    data.get_dataset({"task": "mul"}, "train", tokenizer=TOK, batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match="valid: builtin"):
    data.get_dataset({"source": "csv"}, "train", tokenizer=TOK, batch_size=2, seq_len=16)


def test_builtin_dataset_and_eval_examples():
  ds = data.get_dataset(_cfg(task="add", train_size=123), "train", tokenizer=TOK, batch_size=8, seq_len=32)
  assert len(ds) == 123 and ds.report.skipped == 0
  batch = next(iter(ds))
  for tokens, learned in _docs(batch):
    text = TOK.decode(tokens)
    prompt = text[:text.index("=") + 1]
    assert TOK.decode(learned) == _answer("add", prompt) and learned[-1] == TOK.eos_id
  pairs, check = data.eval_examples(_cfg(task="add"), "test", 20)
  assert len(pairs) == 20 and all(check(p, a) for p, a in pairs)
  assert not any(check(p, a + "1") for p, a in pairs)
  train_prompts = {TOK.decode(tokens).split("=")[0] + "=" for tokens, _ in ds.examples}
  assert not train_prompts & {p for p, _ in pairs}
  assert isinstance(data.get_tokenizer(_cfg()), data.CharTokenizer)
