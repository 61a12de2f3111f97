"""TempBalance inside the real trainer: multipliers refreshed from alpha, per-layer update sizes follow them,
alphas logged per block."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import losses
import models
import optim
import peft
import train_lib
from configs import sft
from train_lib import train as train_mod


def _batch(vocab, B=4, T=16, seed=0):
  t = jax.random.randint(jax.random.PRNGKey(seed), (B, 1, T + 1), 3, vocab)
  return {"inputs": t[..., :-1], "targets": t[..., 1:], "loss_mask": jnp.ones((B, 1, T)),
          "positions": jnp.broadcast_to(jnp.arange(T), (B, 1, T)), "segment_ids": jnp.ones((B, 1, T), jnp.int32)}


def test_layerwise_update_sizes_follow_multipliers_in_a_train_step():
  cfg = models.DecoderConfig.tiny(vocab_size=61, hidden_size=96, intermediate_size=160, num_layers=3)
  model = models.Decoder(cfg)
  params = model.init(jax.random.PRNGKey(0))
  tb_cfg = optim.tempbalance_config(ml_collections.ConfigDict(dict(eigs_thresh=16, esd_preset="model_balancing")))
  lr = 1e-3
  step = lambda tx: jax.jit(functools.partial(train_mod.train_step, model=model, tx=tx, schedule=lambda s: lr,
                                              loss_entry=losses.get("nll"),
                                              loss_cfg=ml_collections.ConfigDict({})))
  plain, balanced = optax.adam(lr), optim.tempbalance(optax.adam(lr))
  st_p = train_mod.TrainState(jnp.zeros((), jnp.int32), params, plain.init(params), jax.random.PRNGKey(1))
  opt_b = optim.refresh_multipliers(balanced.init(params), params, tb_cfg)
  st_b = train_mod.TrainState(jnp.zeros((), jnp.int32), params, opt_b, jax.random.PRNGKey(1))
  batch = _batch(61)
  _, frozen = peft.split(params)           # full fine-tuning: nothing frozen
  new_p, _ = step(plain)(st_p, frozen, None, batch)
  new_b, _ = step(balanced)(st_b, frozen, None, batch)
  sched = optim.schedule(params, tb_cfg)
  assert len(sched.per_record) >= 6
  mults = np.asarray(list(sched.per_record.values()))
  assert mults.max() - mults.min() > 0.1            # a real spread of learning rates
  for (path, layer), f in sched.per_record.items():
    get = lambda t: np.asarray(peft.flatten(t)[path])[layer]
    d_plain = get(new_p.params) - get(params)
    d_bal = get(new_b.params) - get(params)
    np.testing.assert_allclose(d_bal, f * d_plain, rtol=1e-4, atol=1e-9, err_msg=f"{path}[{layer}]")


def test_trainer_refreshes_multipliers_and_logs_block_alphas(tmp_path):
  config = sft.get_config("model=tiny,smoke")
  config.model.overrides = ml_collections.ConfigDict(dict(hidden_size=96, intermediate_size=160))
  config.tempbalance.enabled = True
  config.tempbalance.esd_interval = 4
  config.tempbalance.eigs_thresh = 16
  config.tempbalance.esd_preset = "model_balancing"
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  logged = [r for r in records if "alpha/block_0" in r]
  assert [r["step"] for r in logged] == [0, 4]
  assert all(1.0 < r["alpha/block_1"] < 20 for r in logged)
  lr_states = [s for s in jax.tree.leaves(summary["state"].opt_state,
                                          is_leaf=lambda x: isinstance(x, optim.ScaleByLayerwiseLrState))
               if isinstance(s, optim.ScaleByLayerwiseLrState)]
  assert lr_states
  f = np.concatenate([np.ravel(x) for x in jax.tree.leaves(lr_states[0])])
  assert f.min() < 0.99 and f.max() > 1.01
  # eval / export / diagnose rebuild the run's optimizer (TempBalance included) to read the checkpoint.
  from train_lib import build
  _, _, params, _ = build.load_trained(str(tmp_path))
  np.testing.assert_array_equal(peft.flatten(params)["layers/attn/q_proj/kernel"],
                                peft.flatten(summary["state"].params)["layers/attn/q_proj/kernel"])


def test_tempbalance_composes_with_galore_in_the_trainer(tmp_path):
  from configs import galore as galore_config
  config = galore_config.get_config("model=tiny,smoke,rank=4")
  config.model.overrides = ml_collections.ConfigDict(dict(hidden_size=96, intermediate_size=160))
  config.optim.galore.update_proj_gap = 4
  config.tempbalance.enabled = True
  config.tempbalance.esd_interval = 4
  config.tempbalance.eigs_thresh = 16
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summary["after"]["loss"] < summary["before"]["loss"]
  lr_states = [s for s in jax.tree.leaves(summary["state"].opt_state,
                                          is_leaf=lambda x: isinstance(x, optim.ScaleByLayerwiseLrState))
               if isinstance(s, optim.ScaleByLayerwiseLrState)]
  f = np.concatenate([np.ravel(x) for x in jax.tree.leaves(lr_states[0])])
  assert f.min() < 0.99 and f.max() > 1.01    # the back-projected GaLore updates are scaled per layer


def test_resumed_run_maps_the_same_fit_as_the_uninterrupted_one(tmp_path):
  """A run resumed between two ESD fits (fits at steps 0 and 4, resumed at 6) restores the last fit from the
  checkpoint: the multipliers it writes on resume, and so the final weights, equal the uninterrupted run's.
  (Without the saved fit, the resumed run fitted the weights of step 6 instead of step 4's.)"""
  import shutil  # pylint: disable=g-import-not-at-top
  config = sft.get_config("model=tiny,smoke")
  config.model.overrides = ml_collections.ConfigDict(dict(hidden_size=96, intermediate_size=160))
  config.tempbalance.enabled = True
  config.tempbalance.esd_interval = 4
  config.tempbalance.eigs_thresh = 16
  config.tempbalance.esd_preset = "model_balancing"
  # Multipliers of 1 until the step after warm-up: the hook runs every step, the resumed one included.
  config.tempbalance.after_warm, config.optim.warmup_steps = True, 2
  config.total_steps, config.checkpoint_every_steps, config.keep_checkpoints = 8, 6, 3
  config.async_checkpoints, config.eval_before, config.eval.num_examples = False, False, 0
  full = train_lib.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "8"))
  resumed = train_lib.train_and_evaluate(config, str(tmp_path))
  assert resumed["resumed_from"] == 6
  a, b = peft.flatten(jax.device_get(full["state"].params)), peft.flatten(jax.device_get(resumed["state"].params))
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
