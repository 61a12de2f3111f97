"""TempBalance / Model Balancing as their code defines them: network-order exclusions (block 0's q_proj,
lm_head), every `config.tempbalance` key reaching the multipliers by its formula, the weight-decay mask of
the optimizer factory, and TempBalance composed with layer sampling."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import diagnostics as dg
import hooks
import models
import optim
import peft


def _tiny(vocab=61, L=3):
  cfg = models.DecoderConfig.tiny(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_layers=L)
  return cfg, models.Decoder(cfg).init(jax.random.PRNGKey(0))


def _direct_alpha(w, xmin_pos=2.0):
  """The median-xmin Hill estimate of TempBalance's `net_esd_estimator`, from the singular values."""
  lam = np.sort(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False) ** 2)
  i = int(len(lam) / xmin_pos)
  return 1 + (len(lam) - i) / np.sum(np.log(lam[i:] / lam[i]))


def _linear(a, lo, hi):
  a = np.asarray(a, np.float64)
  return lo + (hi - lo) * (a - a.min()) / (a.max() - a.min())


# ---------------------------------------------------------------------------------------------------
# 1. Network order: TempBalance drops block 0's q_proj and lm_head, Model Balancing lm_head
# ---------------------------------------------------------------------------------------------------
def test_first_last_exclusion_is_network_order_with_lm_head():
  _, params = _tiny()
  tb_records = dg.analyze(params, dg.EsdConfig.tempbalance(eigs_thresh=16, precision="float64"))
  order = [(r.path.split("/")[-2], r.layer) for r in tb_records]
  assert order == [(m, l) for l in range(3) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj")] + [("lm_head", None)]
  assert [(r.path, r.layer) for r in tb_records if r.skipped == "first"] == [("layers/attn/q_proj/kernel", 0)]
  assert [(r.path, r.layer) for r in tb_records if r.skipped == "last"] == [("lm_head/kernel", None)]

  mb_records = dg.analyze(params, dg.EsdConfig.model_balancing(eigs_thresh=16, precision="float64"))
  assert [(r.path, r.skipped) for r in mb_records if r.skipped] == [("lm_head/kernel", "last")]

  # The switch: without lm_head the last matrix is block L-1's down_proj.
  no_head = dg.analyze(params, dg.EsdConfig.model_balancing(eigs_thresh=16, precision="float64",
                                                           include_lm_head=False))
  assert [(r.path, r.layer) for r in no_head if r.skipped] == [("layers/mlp/down_proj/kernel", 2)]

  # From the trainer's config section, TempBalance's and Model Balancing's presets do the same.
  for preset, expected in (("tempbalance", {("layers/attn/q_proj/kernel", 0), ("lm_head/kernel", None)}),
                           ("model_balancing", {("lm_head/kernel", None)})):
    tb = optim.tempbalance_config(dict(esd_preset=preset, eigs_thresh=16))
    sched = optim.schedule(params, tb.replace(esd=tb.esd.replace(precision="float64")))
    scheduled = set(sched.per_record)
    analysed = {(r.path, r.layer) for r in sched.records}
    assert analysed - scheduled == expected


def test_tempbalance_removes_before_the_eigenvalue_filter_model_balancing_after():
  # vocab 20 < eigs_thresh: lm_head has too few eigenvalues. TempBalance drops its last row (lm_head)
  # before the filter, so nothing else goes; Model Balancing filters first, then drops the last fitted one.
  _, params = _tiny(vocab=20)
  tb_rec = dg.analyze(params, dg.EsdConfig.tempbalance(eigs_thresh=32, precision="float64"))
  assert [(r.path, r.skipped) for r in tb_rec if r.skipped in ("first", "last")] == [
      ("layers/attn/q_proj/kernel", "first")]
  assert tb_rec[-1].path == "lm_head/kernel" and tb_rec[-1].skipped == "eigs_thresh"
  mb_rec = dg.analyze(params, dg.EsdConfig.model_balancing(eigs_thresh=32, precision="float64"))
  assert [(r.path, r.layer) for r in mb_rec if r.skipped == "last"] == [("layers/mlp/down_proj/kernel", 2)]


# ---------------------------------------------------------------------------------------------------
# 2. Every config key -> the multipliers, against formulas evaluated here
# ---------------------------------------------------------------------------------------------------
def _tree(seed=0, L=3, D=48):
  """Stacked q_proj slices with clearly different tails, a norm, an unstacked head."""
  rng = np.random.default_rng(seed)
  q = np.stack([rng.standard_t(dof, size=(D, D)) for dof in (1.5, 3.0, 12.0)[:L]])
  up = np.stack([rng.standard_t(dof, size=(D, 64)) for dof in (8.0, 2.0, 4.0)[:L]])
  return {"layers": {"attn": {"q_proj": {"kernel": jnp.asarray(q, jnp.float32)}},
                     "mlp": {"up_proj": {"kernel": jnp.asarray(up, jnp.float32)}},
                     "attn_norm": {"scale": jnp.ones((L, D), jnp.float32)}},
          "lm_head": {"kernel": jnp.asarray(rng.standard_t(4, size=(D, 40)), jnp.float32)}}


class _State(NamedTuple):
  params: Any
  opt_state: Any


class _Model(NamedTuple):
  config: Any


def _run_config(**tb):
  c = ml_collections.ConfigDict()
  c.tempbalance = optim.tempbalance_default_config()
  c.tempbalance.update(dict(enabled=True, esd_interval=2, eigs_thresh=10, remove_first=False,
                            remove_last=False, include_lm_head=False))
  c.tempbalance.update(tb)
  c.optim = optim.default_config()
  c.optim.warmup_steps = 3
  c.optim.adamw.weight_decay = 0.1
  c.total_steps = 10
  return c


def _hook_run(config, params, steps, move=None):
  """Drives the registered host hook as the trainer does; `move(step, params)` changes the weights."""
  hook = hooks.get_hook("tempbalance")(config, _Model(ml_collections.ConfigDict(dict(num_layers=3))))
  params = hook.init_params(params, None)
  trainable, frozen = peft.split(params)
  tx, _ = optim.from_config(config, trainable)
  state = _State(trainable, tx.init(trainable))
  out = {}
  for step in steps:
    if move is not None:
      state = state._replace(params=move(step, state.params))
    if step % hook.every == 0:
      state, frozen, _ = hook.refresh(step, state, frozen, tx)
    out[step] = state
  return out, tx


def _mults(opt_state, kind, path="layers/attn/q_proj/kernel"):
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]
  assert len(states) == 1, kind
  return np.asarray(peft.flatten(states[0].multipliers)[path])


def _layer_alphas(params, xmin_pos=2.0):
  """Per (path, block) alphas of the analysed kernels of `_tree`, in network order."""
  out = {}
  for l in range(3):
    out[("layers/attn/q_proj/kernel", l)] = _direct_alpha(params["layers"]["attn"]["q_proj"]["kernel"][l], xmin_pos)
    out[("layers/mlp/up_proj/kernel", l)] = _direct_alpha(params["layers"]["mlp"]["up_proj"]["kernel"][l], xmin_pos)
  return out


@pytest.mark.parametrize("xmin_pos", [2.0, 1.5])
def test_hyperparam_lr_wd_hybrid_and_xmin_pos(xmin_pos):
  params = _tree()
  a = _layer_alphas(params, xmin_pos)
  keys = list(a)
  kw = dict(xmin_pos=xmin_pos, lr_min_ratio=0.3, lr_slope=1.2, wd_min_ratio=0.2, wd_slope=0.4)
  f_lr = dict(zip(keys, _linear([a[k] for k in keys], 0.3, 1.5)))
  f_wd = dict(zip(keys, _linear([a[k] for k in keys], 0.2, 0.6)))
  q = lambda f: np.asarray([f[("layers/attn/q_proj/kernel", l)] for l in range(3)])

  lr_run, _ = _hook_run(_run_config(hyperparam="lr", **kw), params, [0])
  np.testing.assert_allclose(_mults(lr_run[0].opt_state, optim.ScaleByLayerwiseLrState), q(f_lr), rtol=1e-4)

  wd_run, tx = _hook_run(_run_config(hyperparam="wd", **kw), params, [0])
  state = wd_run[0].opt_state
  assert not any(isinstance(s, optim.ScaleByLayerwiseLrState)
                 for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.ScaleByLayerwiseLrState)))
  f = _mults(state, optim.LayerwiseDecayState)
  np.testing.assert_allclose(f, q(f_wd), rtol=1e-4)
  # With zero gradients only the decay is left: -eta_t * wd * f_wd * p per slice (eta_0 = 0 in warmup, so
  # step the schedule once), and the norm scale is not decayed (the factory's mask).
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zeros, state, params)
  u, _ = tx.update(zeros, state, params)
  eta1 = 1e-3 * 1 / 3
  np.testing.assert_allclose(u["layers"]["attn"]["q_proj"]["kernel"],
                             -eta1 * 0.1 * f[:, None, None] * np.asarray(params["layers"]["attn"]["q_proj"]["kernel"]),
                             rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(u["layers"]["attn_norm"]["scale"], 0.0)

  hy_run, _ = _hook_run(_run_config(hyperparam="hybrid", **kw), params, [0])
  np.testing.assert_allclose(_mults(hy_run[0].opt_state, optim.ScaleByLayerwiseLrState), q(f_lr), rtol=1e-4)
  np.testing.assert_allclose(_mults(hy_run[0].opt_state, optim.LayerwiseDecayState), q(f_wd), rtol=1e-4)


def test_block_unit_spreads_inside_each_block():
  params = _tree()
  a = _layer_alphas(params)
  block_mean = np.asarray([(a[("layers/attn/q_proj/kernel", l)] + a[("layers/mlp/up_proj/kernel", l)]) / 2
                           for l in range(3)])
  d = block_mean - block_mean.mean()
  f_block = 10 ** (np.where(d > 0, 1.0, 2.0) * (1 / (1 + np.exp(-10 * d)) - 0.5))
  run, _ = _hook_run(_run_config(assign="sigmoid", granularity="block", block_unit="block"), params, [0])
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState), f_block, rtol=1e-4)
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState, "layers/attn_norm/scale"),
                             f_block, rtol=1e-4)
  run, _ = _hook_run(_run_config(assign="sigmoid", granularity="block", block_unit="layer"), params, [0])
  # Inside block l: [0.5, 1.5] * f_block[l], q_proj at 0.5 where its alpha is the block's smaller one.
  spread = np.asarray([0.5 if a[("layers/attn/q_proj/kernel", l)] < a[("layers/mlp/up_proj/kernel", l)] else 1.5
                       for l in range(3)])
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState), spread * f_block, rtol=1e-4)

  # Model Balancing's per-layer sigmoid (granularity layer): d is each matrix's alpha minus the mean.
  run, _ = _hook_run(_run_config(assign="sigmoid", granularity="layer"), params, [0])
  vals = np.asarray(list(a.values()))
  d = vals - vals.mean()
  f = dict(zip(a, 10 ** (np.where(d > 0, 1.0, 2.0) * (1 / (1 + np.exp(-10 * d)) - 0.5))))
  up = [f[("layers/mlp/up_proj/kernel", l)] for l in range(3)]
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState, "layers/mlp/up_proj/kernel"),
                             up, rtol=1e-4)
  norm = lambda r: _mults(r[0].opt_state, optim.ScaleByLayerwiseLrState, "layers/attn_norm/scale")
  np.testing.assert_array_equal(norm(run), 1.0)                 # TempBalance: norms at the base rate
  # Model Balancing's trainer: a norm takes the rate of its block's last matrix (here up_proj).
  run, _ = _hook_run(_run_config(assign="sigmoid", granularity="layer", norm_rate="block_last"), params, [0])
  np.testing.assert_allclose(norm(run), up, rtol=1e-4)


def _drift(step, p):
  """A weight change per step with its own spectrum (block 0's q_proj moves by a heavy-tailed matrix)."""
  rng = np.random.default_rng(100 + step)
  q = np.asarray(p["layers"]["attn"]["q_proj"]["kernel"]).copy()
  up = np.asarray(p["layers"]["mlp"]["up_proj"]["kernel"]).copy()
  q += 0.3 * rng.standard_t(2.0, size=q.shape)
  up += 0.3 * rng.standard_normal(up.shape)
  return {**p, "layers": {**p["layers"], "attn": {"q_proj": {"kernel": jnp.asarray(q, jnp.float32)}},
                          "mlp": {"up_proj": {"kernel": jnp.asarray(up, jnp.float32)}}}}


def test_esd_type_cul_fits_the_update_and_fix_tb_metric_keeps_w0():
  params = _tree()
  moved = {}

  def move(step, p):
    p = _drift(step, p) if step > 0 else p
    moved[step] = p
    return p

  run, _ = _hook_run(_run_config(esd_type="cul"), params, [0, 1, 2], move)
  # Step 0: the full ESD (W_0 - W_0 = 0), as Model Balancing; step 2: the ESD of W_2 - W_0.
  a0 = _layer_alphas(params)
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState),
                             _linear(list(a0.values()), 0.5, 1.5)[0::2], rtol=1e-4)
  delta = jax.tree.map(lambda x, y: x - y, moved[2], params)
  a2 = _layer_alphas(delta)
  expected = dict(zip(a2, _linear(list(a2.values()), 0.5, 1.5)))
  np.testing.assert_allclose(_mults(run[2].opt_state, optim.ScaleByLayerwiseLrState),
                             [expected[("layers/attn/q_proj/kernel", l)] for l in range(3)], rtol=1e-4)

  full, _ = _hook_run(_run_config(), params, [0, 1, 2], move)
  a_full = _layer_alphas(moved[2])
  expected_full = dict(zip(a_full, _linear(list(a_full.values()), 0.5, 1.5)))
  np.testing.assert_allclose(_mults(full[2].opt_state, optim.ScaleByLayerwiseLrState),
                             [expected_full[("layers/attn/q_proj/kernel", l)] for l in range(3)], rtol=1e-4)
  fixed, _ = _hook_run(_run_config(fix_tb_metric=True), params, [0, 1, 2], move)
  np.testing.assert_allclose(_mults(fixed[2].opt_state, optim.ScaleByLayerwiseLrState),
                             _mults(full[0].opt_state, optim.ScaleByLayerwiseLrState), rtol=1e-6)
  assert not np.allclose(_mults(full[2].opt_state, optim.ScaleByLayerwiseLrState),
                         _mults(full[0].opt_state, optim.ScaleByLayerwiseLrState), rtol=1e-3)


def test_after_warm_keeps_multipliers_at_one_through_warmup():
  params = _tree()
  config = _run_config(after_warm=True)
  config.optim.warmup_steps = 2                  # fits at steps 0, 2, 4; Model Balancing maps from step 3
  run, _ = _hook_run(config, params, range(5))
  for step in range(3):
    np.testing.assert_array_equal(_mults(run[step].opt_state, optim.ScaleByLayerwiseLrState), 1.0)
  a = _layer_alphas(params)
  expected = _linear(list(a.values()), 0.5, 1.5)[0::2]
  # From the first step after warm-up, with the latest fit (step 2's), not only from the next fit.
  np.testing.assert_allclose(_mults(run[3].opt_state, optim.ScaleByLayerwiseLrState), expected, rtol=1e-4)
  without, _ = _hook_run(_run_config(), params, [0])
  np.testing.assert_allclose(_mults(without[0].opt_state, optim.ScaleByLayerwiseLrState), expected, rtol=1e-4)


def test_exclusion_keys_reach_the_schedule():
  params = _tree()
  a = _layer_alphas(params)
  keys = list(a)          # network order: q0, up0, q1, up1, q2, up2
  run, _ = _hook_run(_run_config(remove_first=True, remove_last=True), params, [0])
  kept = keys[1:-1]
  f = dict(zip(kept, _linear([a[k] for k in kept], 0.5, 1.5)))
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState),
                             [1.0, f[keys[2]], f[keys[4]]], rtol=1e-4)
  run, _ = _hook_run(_run_config(remove_last=True, include_lm_head=True), params, [0])   # lm_head goes
  np.testing.assert_allclose(_mults(run[0].opt_state, optim.ScaleByLayerwiseLrState),
                             _linear(list(a.values()), 0.5, 1.5)[0::2], rtol=1e-4)


def test_config_rejects_unknown_values():
  for bad in (dict(hyperparam="momentum"), dict(esd_type="weird"), dict(xmin_pos=1.0), dict(block_unit="x")):
    with pytest.raises(ValueError, match="tempbalance"):
      optim.TempBalanceRun.from_config({**dict(enabled=True, esd_interval=1), **bad})


def test_wd_variant_needs_a_decoupled_decay():
  c = _run_config(hyperparam="wd")
  c.optim.adamw.weight_decay = 0.0
  with pytest.raises(ValueError, match="weight_decay"):
    optim.from_config(c, _tree())
  c.optim.name = "adafactor"
  c.optim.adafactor.weight_decay = 0.1
  with pytest.raises(ValueError, match="adafactor"):
    optim.from_config(c, _tree())


# ---------------------------------------------------------------------------------------------------
# 4. The weight-decay mask of the factory
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "galore", "hft"])
def test_weight_decay_mask_spares_norms_and_biases(name):
  """`optim.no_decay` holds for every optimizer that decays, HFT's inner one included."""
  rng = np.random.default_rng(0)
  params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((20, 16)), jnp.float32)},
            "layers": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32),
                                           "bias": jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)}},
                       "attn_norm": {"scale": jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)}},
            "final_norm": {"scale": jnp.asarray(rng.standard_normal(16), jnp.float32)}}
  cfg = optim.default_config()
  cfg.name, cfg.warmup_steps, cfg.schedule, cfg.grad_clip_norm = name, 0, "constant", 0.0
  cfg["adamw" if name == "hft" else name].weight_decay = 0.1    # HFT decays through its inner AdamW
  if name == "galore":
    cfg.galore.rank = 4
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optim.make(cfg, params, 10)
  u, _ = tx.update(zeros, tx.init(params), params)
  flat, p = peft.flatten(u), peft.flatten(params)
  for path in ("layers/attn/q_proj/kernel", "embed/embedding"):       # decayed: -lr * wd * p
    np.testing.assert_allclose(flat[path], -1e-3 * 0.1 * np.asarray(p[path]), rtol=1e-5)
  for path in ("layers/attn/q_proj/bias", "layers/attn_norm/scale", "final_norm/scale"):
    np.testing.assert_array_equal(flat[path], 0.0)
  cfg.no_decay = ""                                                     # TempBalance's SGD: decay all
  tx, _ = optim.make(cfg, params, 10)
  u, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(peft.flatten(u)["final_norm/scale"], -1e-4 * np.asarray(p["final_norm/scale"]),
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 5. TempBalance with layer sampling: alphas of every block, multipliers of the sampled ones
# ---------------------------------------------------------------------------------------------------
def test_slots_take_their_blocks_multipliers_after_every_draw():
  params = _tree()
  config = _run_config()
  config.sampling = ml_collections.ConfigDict(dict(method="lisa", gamma=1, interval_steps=1))
  hook = hooks.get_hook("tempbalance")(config, _Model(ml_collections.ConfigDict(dict(num_layers=3))))
  assert hook.every == 1
  sampled = peft.sample_layers(params, [1])
  trainable, frozen = peft.split(sampled)
  tx = optim.tempbalance(optax.adam(1e-3))
  state = _State(trainable, tx.init(trainable))
  state, frozen, _ = hook.refresh(0, state, frozen, tx)
  a = _layer_alphas(params)
  f = dict(zip(a, _linear(list(a.values()), 0.5, 1.5)))
  slots = lambda st: _mults(st.opt_state, optim.ScaleByLayerwiseLrState, "layers/attn/q_proj/kernel/slots")
  np.testing.assert_allclose(slots(state), [f[("layers/attn/q_proj/kernel", 1)]], rtol=1e-4)
  # A redraw (block 2; the sampler resets the slots' state to a fresh init) at a step without a fit.
  trainable, frozen = peft.resample(state.params, frozen, [2])
  state = _State(trainable, tx.init(trainable))
  state, frozen, _ = hook.refresh(1, state, frozen, tx)
  np.testing.assert_allclose(slots(state), [f[("layers/attn/q_proj/kernel", 2)]], rtol=1e-4)


@pytest.mark.slow
def test_tempbalance_with_lisa_in_the_trainer(tmp_path):
  import train_lib
  from configs import lisa
  config = lisa.get_config("model=tiny,smoke")            # gamma 1, draws at steps 0 and 4 of 8
  config.model.overrides = ml_collections.ConfigDict(dict(hidden_size=96, intermediate_size=160))
  config.tempbalance.enabled = True
  config.tempbalance.esd_interval = 8                     # one fit, at step 0 (on W_0)
  config.tempbalance.eigs_thresh = 16
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summary["after"]["loss"] < summary["before"]["loss"]
  blocks = peft.sampled_blocks(summary["frozen"])
  p = optim.layer_probs("uniform", 2)
  np.testing.assert_array_equal(blocks, optim.draw(config.seed, 4, p, 1))
  cfg = models.DecoderConfig.tiny(vocab_size=summary["state"].params["lm_head"]["kernel"].shape[-1],
                                  hidden_size=96, intermediate_size=160)
  w0 = models.Decoder(cfg).init(jax.random.PRNGKey(config.seed))
  tb = optim.tempbalance_config(config.tempbalance)
  sched = optim.schedule(w0, tb)
  assert len(sched.per_record) >= 8
  for path in ("layers/attn/q_proj/kernel", "layers/mlp/down_proj/kernel"):
    got = _mults(summary["state"].opt_state, optim.ScaleByLayerwiseLrState, path + "/slots")
    want = [sched.per_record.get((path, int(b)), 1.0) for b in blocks]
    np.testing.assert_allclose(got, want, rtol=1e-3)
  assert not np.allclose([sched.per_record[k] for k in sched.per_record], 1.0)
