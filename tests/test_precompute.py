"""The `precompute` task (train_lib/precompute.py): a reference model's log-probs written into the records.

DPO reading the precomputed file gives the loss and the step of DPO with the live reference model; PoFT's
aligned log-probs from the same task make its margin zero at the model they were computed with.
"""
import copy
import functools
import json
import os

import jax
import numpy as np
import pytest

import data as data_lib
import losses
import models
import optim
from configs import dpo, precompute as precompute_cfg, sft
from train_lib import build, evaluate, sharding
from train_lib import precompute as precompute_lib
from train_lib import tasks
from train_lib import train as train_mod


def _config(module, arg, **data):
  config = module.get_config(arg)
  config.batch_size = 4
  config.data.train_size = 12
  config.data.eval_size = 4
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  for k, v in data.items():
    config.data[k] = v
  return config


def _hf_reference(config, path):
  """A tiny model as the trainer builds it, saved as an HF checkpoint: (path, params)."""
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build.build_model(config, tokenizer, sharding.make_mesh(config.get("mesh")))
  models.save_hf(path, model.config, jax.device_get(params), model_type="llama")
  return path, params


def _precompute(config, reference, workdir, **kw):
  pc = precompute_cfg.get_config()
  pc.reference = reference
  pc.data = config.data
  pc.seq_len = config.seq_len
  pc.batch_size = 4
  pc.splits = "train"
  for k, v in kw.items():
    pc[k] = v
  return tasks.run_task(pc, workdir)


def _file_data(config, workdir, **fields):
  """A copy of `config` whose data are the precomputed records of `workdir` (same tokenizer)."""
  config = copy.deepcopy(config)
  with config.data.unlocked():
    config.data.source = "jsonl"
    config.data.path = os.path.join(workdir, "{split}.jsonl")
    config.data.tokenizer = "char"
    config.data.train_size = None
    for k, v in fields.items():
      config.data[k] = v
  return config


def _step(config, params, with_ref_params):
  tokenizer = data_lib.get_tokenizer(config.data)
  model, _ = build.build_model(config, tokenizer, sharding.make_mesh(config.get("mesh")))
  trainable, frozen = build.split_trainable(params)
  tx, schedule = optim.from_config(config, trainable)
  entry = losses.get(config.loss.name)
  state = build.init_state(tx, trainable, config.seed)
  batch = evaluate.to_model_batch(next(iter(data_lib.get_dataset(
      config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size, seq_len=config.seq_len, seed=0))))
  step = jax.jit(functools.partial(train_mod.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=entry, loss_cfg=config.loss))
  state, metrics = step(state, frozen, params if with_ref_params else None, batch)
  return batch, jax.device_get(metrics), jax.device_get(state.params)


def test_dpo_from_precomputed_file_equals_live_reference(tmp_path):
  config = _config(dpo, "model=tiny,smoke,adapter=none", pref_kind="pairwise")
  ref_dir, params = _hf_reference(config, str(tmp_path / "ref"))
  out = str(tmp_path / "pre")
  written = _precompute(config, ref_dir, out)
  records = [json.loads(l) for l in open(written["train"])]
  assert len(records) == 12 and all(len(r["ref_logps"]) == 2 for r in records)

  live_batch, live, live_params = _step(config, params, with_ref_params=True)
  file_cfg = _file_data(config, out, ref_logps_field="ref_logps")
  file_batch, pre, pre_params = _step(file_cfg, params, with_ref_params=False)
  # The same records in the same order, now carrying the reference's numbers.
  np.testing.assert_array_equal(live_batch["inputs"], file_batch["inputs"])
  assert "ref_logps" in file_batch and "ref_logps" not in live_batch
  # A random-init policy equals its reference at step 0: DPO's loss is log 2 either way, which would not
  # tell a wrong reference apart, so compare the reference log-probs the loss saw, and the step.
  np.testing.assert_allclose(pre["loss"], live["loss"], rtol=1e-5)
  np.testing.assert_allclose(pre["logps/chosen"], live["logps/chosen"], rtol=1e-5)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    np.testing.assert_allclose(pre[k], live[k], atol=1e-5)
  for a, b in zip(jax.tree.leaves(pre_params), jax.tree.leaves(live_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The file's numbers are the reference's summed completion log-probs of the batch's sequences.
  want = losses.model_outputs(build.build_model(config, data_lib.get_tokenizer(config.data))[0], params,
                              {k: live_batch[k] for k in data_lib.FIELDS})["logps"]
  np.testing.assert_allclose(file_batch["ref_logps"], np.asarray(want), rtol=1e-5)

  # A shifted reference number moves the loss by the DPO formula: the file is what the loss reads.
  for r in records:
    r["ref_logps"] = [r["ref_logps"][0] - 1.0, r["ref_logps"][1]]    # the reference likes chosen less
  data_lib.write_jsonl(written["train"], records)
  _, shifted, _ = _step(file_cfg, params, with_ref_params=False)
  beta = config.loss.get("beta", 0.1)
  # policy == the unshifted reference: margin = beta * 1.0 for every pair, loss = -log sigma(beta)
  np.testing.assert_allclose(shifted["rewards/margins"], beta, rtol=1e-4)
  np.testing.assert_allclose(shifted["loss"], np.log1p(np.exp(-beta)), rtol=1e-4)


def test_poft_from_precomputed_aligned_logps(tmp_path):
  config = _config(sft, "model=tiny,smoke")
  ref_dir, params = _hf_reference(config, str(tmp_path / "ref"))
  out1, out2 = str(tmp_path / "a1"), str(tmp_path / "a2")
  _precompute(config, ref_dir, out1)
  # A second aligned model appends its number: M = 2 (the same model twice here).
  _precompute(_file_data(config, out1), ref_dir, out2, append=True)
  records = [json.loads(l) for l in open(os.path.join(out2, "train.jsonl"))]
  assert all(len(r["aligned_logps"]) == 2 and r["aligned_logps"][0] == r["aligned_logps"][1] for r in records)
  file_cfg = _file_data(config, out2, aligned_logps_field="aligned_logps", packing="none")
  file_cfg.loss.name = "poft"
  batch, m, _ = _step(file_cfg, params, with_ref_params=False)
  assert batch["aligned_logps"].shape == (4, 1, 2)
  # The policy is the aligned model: every margin is 0 and the loss is log 2.
  np.testing.assert_allclose(m["poft/margin"], 0.0, atol=1e-4)
  np.testing.assert_allclose(m["loss"], np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(m["logps/aligned"], m["logps/policy"], rtol=1e-5)
  # Per-example numbers cannot follow packed rows.
  packed = _file_data(config, out2, aligned_logps_field="aligned_logps", packing="first_fit")
  with pytest.raises(ValueError, match="packing='none'"):
    data_lib.get_dataset(packed.data, "train", tokenizer=data_lib.get_tokenizer(packed.data), batch_size=4,
                         seq_len=packed.seq_len)


def test_reference_path_must_be_a_workdir_or_hf_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a project workdir"):
    precompute_lib.load_model(str(tmp_path))
