"""Padding-free preference batches (data/_pref_packing.py, losses/_outputs.py, models `prefix_ids`):
packed and shared-prompt batches give the padded batch's loss and gradient; rows hold several examples
and the per-sequence outputs follow their example; the stream, its state and the process split; bad
input; a trainer run with the switch on."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import losses
from configs import dpo, dpo_kernels, lipo

TOK = data.CharTokenizer()
T = 64
MODES = ("packed", "shared_prompt")


def _cfg(kind, **kw):
  cfg = data.default_config()
  cfg.update({"pref_kind": kind, "tokenizer": "char", "task": "sort", "train_size": 400, "eval_size": 40, **kw})
  return cfg


def _examples(kind, n=8, **kw):
  ds = data.get_dataset(_cfg(kind, **kw), "train", tokenizer=TOK, batch_size=n, seq_len=T)
  return ds.examples[:n]


def _batch(examples, kind, mode, **kw):
  return {k: jnp.asarray(v) for k, v in data.layout(examples, kind, seq_len=T, packing=mode, **kw).items()}


def _losses_and_grads(model, params, ref_params, loss_cfgs):
  """jit(batches -> [(loss, grad) per batch per loss config]): one compilation for all layouts."""
  entries = [losses.get(c.name) for c in loss_cfgs]
  needs = frozenset().union(*(e.needs_for(c) for e, c in zip(entries, loss_cfgs)))

  @jax.jit
  def f(batches):
    out = []
    for batch in batches:
      reference = jax.lax.stop_gradient(losses.model_outputs(model, ref_params, batch, needs))
      for entry, cfg in zip(entries, loss_cfgs):
        loss = lambda p: entry.fn(losses.model_outputs(model, p, batch, needs), reference, batch, cfg)[0]
        out.append(jax.value_and_grad(loss)(params))
    return out
  return f


def _rel(a, b):
  a, b = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b)]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _loss_cfg(name):
  if name in ("dpo", "ipo"):
    return dpo.get_config(f"model=tiny,smoke,loss_type={'sigmoid' if name == 'dpo' else 'ipo'}").loss
  if name == "lipo":
    return lipo.get_config("model=tiny,smoke").loss
  cfg = dpo_kernels.get_config("model=tiny,smoke,kernel=rbf,divergence=js").loss
  cfg.gamma = 0.5       # a kernel term of the size of the log-ratio term, so the embeddings count
  cfg.divergence_scale = 0.5
  return cfg


@pytest.mark.parametrize("names", [("dpo", "ipo"), ("lipo",), ("dpo_kernels",)])
def test_packed_batches_give_the_padded_loss_and_gradient(tiny_model, names):
  model, params = tiny_model(seed=0)
  _, ref_params = tiny_model(seed=1)
  loss_cfgs = [_loss_cfg(n) for n in names]
  kind = "listwise" if names == ("lipo",) else "pairwise"
  examples = _examples(kind)
  if kind == "listwise":   # a list of 3 in K = 4: a padding entry with all masks 0
    ex = examples[2]
    examples[2] = ex._replace(seqs=ex.seqs[:3], scores=ex.scores[:3])
  if names == ("dpo_kernels",):   # prompt embeddings (mean pool) and the last token's logits
    assert {"embeddings", "last_logits", "reference"} <= losses.get("dpo_kernels").needs_for(loss_cfgs[0])
  batches = [_batch(examples, kind, mode) for mode in ("none",) + MODES]
  for b in batches[1:]:
    assert b["inputs"].shape[1] < len(examples) * b["seq_index"].shape[1]   # fewer rows than padded
  got = _losses_and_grads(model, params, ref_params, loss_cfgs)(batches)
  n = len(names)
  for m, mode in enumerate(MODES, start=1):
    for i, name in enumerate(names):
      (loss, grad), (want_loss, want_grad) = got[m * n + i], got[i]
      assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss)), (mode, name, loss, want_loss)
      assert _rel(grad, want_grad) < 1e-5, (mode, name, _rel(grad, want_grad))


def test_rows_hold_several_examples_and_outputs_follow_their_example(tiny_model):
  model, params = tiny_model()
  examples = _examples("pairwise", n=8)
  needs = frozenset({"embeddings", "last_hidden", "last_logits"})
  fwd = jax.jit(lambda b: losses.model_outputs(model, params, b, needs))
  padded = fwd(_batch(examples, "pairwise", "none"))
  perm = np.random.default_rng(0).permutation(len(examples))
  for mode, pack_len in (("packed", None), ("shared_prompt", None), ("shared_prompt", T + 40)):
    batch = _batch(examples, "pairwise", mode, pack_groups=2, pack_len=pack_len)
    L = batch["inputs"].shape[-1]
    assert L == (pack_len or T)
    index = np.asarray(batch["seq_index"])                     # [B, K, T]: group-local slot
    rows_of = [{int(i) // L for i in index[b].ravel() if i >= 0} for b in range(len(examples))]
    group = np.arange(len(examples)) // 4
    shared = [(g, r) for g in range(2) for r in range(batch["inputs"].shape[1])
              if sum((g, r) in {(group[b], x) for x in rows_of[b]} for b in range(len(examples))) > 1]
    assert shared, f"{mode}: no row holds two examples"
    got = fwd(batch)
    got_perm = fwd(_batch([examples[i] for i in perm], "pairwise", mode, pack_groups=2, pack_len=pack_len))
    for key in ("logps", "lengths", "embeddings", "prompt_embeddings", "last_embeddings",
                "prompt_last_embeddings", "last_logits"):
      np.testing.assert_allclose(got[key], padded[key], rtol=1e-5, atol=1e-5, err_msg=f"{mode} {key}")
      np.testing.assert_allclose(got_perm[key], np.asarray(got[key])[perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["mask"], padded["mask"])
    np.testing.assert_allclose(got["token_logps"] * got["mask"], padded["token_logps"] * padded["mask"],
                               rtol=1e-5, atol=1e-6)


def test_unpaired_and_listwise_sequences_give_the_padded_log_probs(tiny_model):
  """KTO's mismatched KL sequence (made per batch) and list padding, in both packed layouts; pairs under a
  sliding window, which counts positions (a shared prompt sits before its completions' siblings)."""
  model, params = tiny_model()
  fwd = jax.jit(lambda bs: [losses.model_outputs(model, params, b) for b in bs])
  window, window_params = tiny_model(sliding_window=6)
  window_fwd = jax.jit(lambda bs: [losses.model_outputs(window, window_params, b) for b in bs])
  for kind in ("unpaired", "listwise", "window"):
    fwd_kind, kind = (window_fwd, "pairwise") if kind == "window" else (fwd, kind)
    examples = _examples(kind, n=4)
    if kind == "listwise":
      examples[1] = examples[1]._replace(seqs=examples[1].seqs[:2], scores=examples[1].scores[:2])
    outs = fwd_kind([_batch(examples, kind, mode) for mode in ("none",) + MODES])
    for mode, got in zip(MODES, outs[1:]):
      np.testing.assert_array_equal(got["lengths"], outs[0]["lengths"])
      np.testing.assert_allclose(got["logps"], outs[0]["logps"], rtol=1e-5, err_msg=f"{kind} {mode}")


def test_shared_prompt_layout_of_the_worked_example():
  fields = data._preference.Fields()
  rec, _ = data.record_preference({"prompt": "a", "chosen": "xy", "rejected": "y"}, "pairwise", fields)
  ex, _ = data.encode_preference(rec, TOK, "pairwise", seq_len=8, max_prompt_len=None, max_response_len=None,
                                 truncate=True, allow_identical=False)
  b = data.layout([ex], "pairwise", seq_len=8, packing="shared_prompt")
  assert b["inputs"].tolist() == [[[1, 13, 36, 37, 2, 13, 37, 2]]]
  assert b["positions"].tolist() == [[[0, 1, 2, 3, 4, 1, 2, 3]]]
  assert b["segment_ids"].tolist() == [[[1, 2, 2, 2, 2, 3, 3, 3]]]
  assert b["prefix_ids"].tolist() == [[[0, 1, 1, 1, 1, 1, 1, 1]]]
  assert b["loss_mask"].tolist() == [[[0, 1, 1, 1, 0, 1, 1, 0]]]
  assert b["seq_index"].tolist() == [[[0, 1, 2, 3, 4, -1, -1, -1], [0, 5, 6, 7, -1, -1, -1, -1]]]


@pytest.mark.parametrize("mode", MODES)
def test_stream_state_resume_and_process_split(mode):
  cfg = _cfg("pairwise", pref_packing=mode, pref_pack_groups=2)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=8, seq_len=T, seed=3, packed_preferences=True)
  padded = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=8, seq_len=T, seed=3)   # other readers
  assert "seq_index" not in next(iter(padded))
  it, it_pad = iter(ds), iter(padded)
  for _ in range(3):
    b, bp = next(it), next(it_pad)
    # Token t of sequence (i, k) read back through seq_index is the padded row's token t.
    rows = b["inputs"].reshape(2, -1)
    index = b["seq_index"]
    got = np.stack([np.where(index[i] >= 0, rows[i // 4][np.maximum(index[i], 0)], 0) for i in range(8)])
    np.testing.assert_array_equal(got, np.where(bp["segment_ids"] > 0, bp["inputs"], 0))
    np.testing.assert_array_equal(b["example_mask"], bp["example_mask"])
  assert it.get_state() == it_pad.get_state()          # the same examples per batch: the padded stream
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=8, seq_len=T, seed=3,
                                packed_preferences=True))
  again.set_state(json.loads(json.dumps(state)))
  for w in want:
    g = next(again)
    assert sorted(g) == sorted(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  # Two processes: each keeps one group of rows and its 4 examples; together they are the global batch.
  parts = []
  for p in range(2):
    pit = iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=8, seq_len=T, seed=3, process_index=p,
                                process_count=2, packed_preferences=True))
    pit.set_state(state)
    parts.append(next(pit))
  for k in want[0]:
    np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), want[0][k], err_msg=k)
  assert parts[0]["inputs"].shape[0] == 1 and parts[0]["seq_index"].shape[0] == 4
  # Evaluation stays padded.
  ev = next(iter(data.get_dataset(cfg, "test", tokenizer=TOK, batch_size=8, seq_len=T, packed_preferences=True)))
  assert "seq_index" not in ev and ev["inputs"].shape == (8, 2, T)


def test_rows_grow_to_the_next_multiple_when_a_batch_needs_more():
  examples = _examples("pairwise", n=8)
  b = data.layout(examples, "pairwise", seq_len=T, packing="packed", pack_rows=1)
  need = data._pref_packing.rows_needed(data._preference.example_sequences(examples, "pairwise", seq_len=T),
                                        "packed", T)
  assert b["inputs"].shape == (1, need, T) and need > 1
  b3 = data.layout(examples, "pairwise", seq_len=T, packing="packed", pack_rows=3)
  assert b3["inputs"].shape[1] == 3 * -(-need // 3)


def test_bad_input_names_the_option():
  with pytest.raises(ValueError, match="pref_packing='nope'"):
    data.get_dataset(_cfg("pairwise", pref_packing="nope"), "train", tokenizer=TOK, batch_size=8, seq_len=T)
  with pytest.raises(ValueError, match="pref_pack_groups=3"):
    data.get_dataset(_cfg("pairwise", pref_packing="packed", pref_pack_groups=3), "train", tokenizer=TOK,
                     batch_size=8, seq_len=T, packed_preferences=True)
  rec, _ = data.record_preference({"prompt": "p" * 10, "chosen": "c" * 12, "rejected": "r" * 12}, "pairwise",
                                  data._preference.Fields())
  ex, _ = data.encode_preference(rec, TOK, "pairwise", seq_len=28, max_prompt_len=None, max_response_len=None,
                                 truncate=True, allow_identical=False)
  with pytest.raises(ValueError, match="pref_pack_len=20"):      # a row shorter than a sequence
    data.PreferenceDataset([ex], kind="pairwise", batch_size=1, seq_len=28, pref_packing="packed", pack_len=20)
  with pytest.raises(ValueError, match="pref_pack_rows=0"):
    data.PreferenceDataset([ex], kind="pairwise", batch_size=1, seq_len=28, pref_packing="packed", pack_rows=0)
  # Prompt + two completions (10 + 14 + 14 = 38 slots) exceed a 28-slot row: the pair is packed as two
  # sequences, without sharing; with 40-slot rows it shares its prompt.
  one = data.PreferenceDataset([ex], kind="pairwise", batch_size=1, seq_len=28, pref_packing="shared_prompt")
  b = next(iter(one))
  assert b["inputs"].shape == (1, 2, 28) and not b["prefix_ids"].any()
  b = next(iter(data.PreferenceDataset([ex], kind="pairwise", batch_size=1, seq_len=28,
                                       pref_packing="shared_prompt", pack_len=40)))
  assert b["inputs"].shape == (1, 1, 40) and b["prefix_ids"].any()
  data.PreferenceDataset([ex], kind="pairwise", batch_size=1, seq_len=28, pref_packing="packed")   # fits


@pytest.mark.slow
def test_trainer_with_shared_prompts_and_accumulation_follows_the_padded_run(tmp_path):
  import train_lib
  from train_lib import validate
  config = dpo.get_config("model=tiny,smoke")
  config.total_steps = 3
  config.eval_before = False
  config.log_every_steps = 1
  config.eval.num_examples = 0
  config.data.pref_packing = "shared_prompt"
  config.data.pref_pack_groups = 2
  config.optim.grad_accum_steps = 2
  bad = dpo.get_config("model=tiny,smoke")
  bad.data.pref_packing, bad.data.pref_pack_groups, bad.optim.grad_accum_steps = "packed", 1, 2
  with pytest.raises(validate.ConfigError, match="pref_pack_groups=1"):
    validate.validate(bad)
  train_lib.train_and_evaluate(config, str(tmp_path / "packed"))
  base = config.copy_and_resolve_references()
  base.data.pref_packing = "none"
  train_lib.train_and_evaluate(base, str(tmp_path / "padded"))
  read = lambda d: [r for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "padding_fraction" in r]
  train, train_padded = read("packed"), read("padded")
  assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
  # The same LoRA DPO run, step for step (gradient accumulation over the two groups of each batch).
  np.testing.assert_allclose([r["loss"] for r in train], [r["loss"] for r in train_padded], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in train], [r["grad_norm"] for r in train_padded], rtol=1e-4)
  # The logged padding is that of the shared-prompt batches, well below the padded batches' of the same stream.
  tok = data.get_tokenizer(config.data)
  fraction = lambda b: 1.0 - np.count_nonzero(b["segment_ids"]) / b["segment_ids"].size
  kw = dict(tokenizer=tok, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
  packed = iter(data.get_dataset(config.data, "train", packed_preferences=True, **kw))
  padded = iter(data.get_dataset(config.data, "train", **kw))
  for r in train:
    want, before = fraction(next(packed)), fraction(next(padded))
    assert abs(r["padding_fraction"] - want) < 1e-6 and want < before - 0.1, (r["padding_fraction"], want, before)


@pytest.mark.slow
def test_two_processes_with_packed_groups_equal_one_padded_device(tmp_path):
  """2 JAX processes x 2 CPU devices (mesh data 4): each process keeps its groups of packed rows and its
  examples (`local_rows`), the rows are sharded by group; losses and LoRA parameters equal a 1-device
  padded run."""
  from tests import train_runner
  spec = "configs/dpo.py:model=tiny,smoke"
  common = {"total_steps": 4, "eval_before": False, "eval.num_examples": 0, "eval.num_loss_batches": 0,
            "log_every_steps": 1, "optim.warmup_steps": 0}
  one = train_runner.run(spec, tmp_path / "one", tmp_path / "one.npz", {**common, "mesh.data": 1})
  multi = train_runner.run_processes(spec, tmp_path / "multi", tmp_path / "multi.npz",
                                     {**common, "mesh.data": 4, "data.pref_packing": "packed",
                                      "data.pref_pack_groups": 4}, processes=2, devices=2)
  assert int(multi["processes"]) == 2 and int(multi["devices"]) == 4
  np.testing.assert_allclose(multi["losses"], one["losses"], rtol=2e-5)
  keys = [k for k in one if k.startswith("param/")]
  assert keys and sorted(keys) == sorted(k for k in multi if k.startswith("param/"))
  for k in keys:
    np.testing.assert_allclose(multi[k], one[k], rtol=2e-4, atol=2e-6, err_msg=k)
  assert len(set(np.round(one["losses"], 6))) > 1     # the loss moved: the steps trained something
