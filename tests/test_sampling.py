"""Layer sampling (`peft/_sampling.py`): slots, draws, host resampling, state reset, memory, validation.

Grouped by behaviour: the slot node computes what the full model computes (values and gradients); draws
follow their probabilities; a train step touches only the sampled blocks; a resampling writes back exactly,
resets only the slots' optimizer state and never recompiles the step; the optimizer state shrinks by the
accounted amount; bad configs fail at hook construction.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import models
import peft
from configs import lisa as lisa_config
from configs import owlore as owlore_config
from optim import _sampling as sampling
from hooks import get_hook
import optim
from train_lib import train as train_mod

V, L = 61, 4


def _model(L=L, **kw):
  return models.Decoder(models.DecoderConfig.tiny(vocab_size=V, num_layers=L, **kw))


@functools.lru_cache(maxsize=None)
def _init(model):
  return jax.jit(model.init)(jax.random.PRNGKey(0))


def _batch(B=4, T=12, seed=0):
  t = jax.random.randint(jax.random.PRNGKey(seed), (B, 1, T + 1), 3, V)
  return {"inputs": t[..., :-1], "targets": t[..., 1:], "loss_mask": jnp.ones((B, 1, T)),
          "positions": jnp.broadcast_to(jnp.arange(T), (B, 1, T)), "segment_ids": jnp.ones((B, 1, T), jnp.int32)}


def _tree_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


# ---------------------------------------------------------------------------------------------------------
# The slot node
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"scan_layers": False, "remat": "full"}])
def test_slots_compute_the_full_model_and_its_gradient_rows(variant):
  model = _model(**variant)
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, V)
  idx = np.array([1, 3])
  sampled = peft.sample_layers(params, idx)
  np.testing.assert_array_equal(model.apply(sampled, tokens), model.apply(params, tokens))

  loss = lambda p: jnp.std(model.apply(p, tokens))
  trainable, frozen = peft.split(sampled)
  g = jax.jit(jax.grad(lambda t: loss(peft.combine(t, frozen))))(trainable)
  g_full = jax.jit(jax.grad(loss))(params)
  for path, leaf in peft.flatten(g_full).items():
    leaf = np.asarray(leaf)
    got, want = ((peft.flatten(g)[path + "/slots"], leaf[idx]) if path.startswith("layers/")
                 else (peft.flatten(g)[path], leaf))
    assert np.abs(want).max() > 0, path
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=path)


def test_split_trains_slots_and_the_always_trainable_leaves():
  params = peft.sample_layers(_init(_model()), [0, 2])
  assert not peft.has_adapters(params)        # full fine-tuning: DPO's reference is a frozen copy
  trainable, frozen = peft.split(params)
  t, f = peft.flatten(trainable), peft.flatten(frozen)
  assert set(t) == {"embed/embedding", "final_norm/scale", "lm_head/kernel"} | {
      p for p in t if p.startswith("layers/") and p.endswith("/slots")}
  assert t["layers/attn/q_proj/kernel/slots"].shape == (2, 64, 64)
  assert f["layers/attn/q_proj/kernel/base"].shape == (L, 64, 64)
  np.testing.assert_array_equal(f["layers/mlp/down_proj/kernel/idx"], [0, 2])
  assert not any(p.startswith(("embed", "lm_head", "final_norm")) for p in f)
  np.testing.assert_array_equal(peft.merge(params)["layers"]["mlp"]["up_proj"]["kernel"],
                                params["layers"]["mlp"]["up_proj"]["kernel"].base)


# ---------------------------------------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------------------------------------
SCORES = np.array([9.0, 1.0, 4.0, 0.5, 2.5, 3.0])   # outlier ratios of 6 blocks


def test_owl_frequencies_match_probabilities_chi_square():
  p = sampling.layer_probs("owl", 6, SCORES)
  np.testing.assert_allclose(p, SCORES / SCORES.sum())
  n = 6000
  counts = np.bincount(np.concatenate([sampling.draw(0, s, p, 1) for s in range(n)]), minlength=6)
  chi2 = np.sum((counts - n * p) ** 2 / (n * p))
  assert chi2 < 20.5                       # chi-square, 5 degrees of freedom, p = 0.001


def test_without_replacement_inclusion_frequencies_match_sequential_draws():
  """gamma = 2: numpy's (and OwLore's) sequential draw without replacement includes block l with
  probability p_l + sum_{k != l} p_k p_l / (1 - p_k), not 2 p_l."""
  p = sampling.layer_probs("owl", 6, SCORES)
  n = 6000
  draws = np.stack([sampling.draw(3, s, p, 2) for s in range(n)])
  assert np.all(draws[:, 0] < draws[:, 1])              # distinct, ascending
  freq = np.bincount(draws.ravel(), minlength=6) / n
  incl = np.array([p[l] + sum(p[k] * p[l] / (1 - p[k]) for k in range(6) if k != l) for l in range(6)])
  assert np.all(np.abs(freq - incl) < 4 * np.sqrt(incl * (1 - incl) / n))
  assert np.max(np.abs(2 * p - incl)) > 8 * np.sqrt(0.25 / n)     # the naive 2p would be told apart


def test_draws_are_a_function_of_seed_and_step():
  p = sampling.layer_probs("uniform", 8)
  assert [tuple(sampling.draw(1, s, p, 3)) for s in range(20)] == [tuple(sampling.draw(1, s, p, 3))
                                                                    for s in range(20)]
  assert len({tuple(sampling.draw(1, s, p, 3)) for s in range(20)}) > 5
  assert tuple(sampling.draw(1, 7, p, 3)) != tuple(sampling.draw(2, 7, p, 3)) or \
      tuple(sampling.draw(1, 8, p, 3)) != tuple(sampling.draw(2, 8, p, 3))


def test_probability_modes():
  L6 = np.arange(6)
  np.testing.assert_allclose(sampling.layer_probs("uniform", 6), np.full(6, 1 / 6))
  np.testing.assert_allclose(sampling.layer_probs("increase", 6), (L6 + 1) / 21)
  np.testing.assert_allclose(sampling.layer_probs("decrease", 6), (6 - L6) / 21)
  p = SCORES / SCORES.sum()
  np.testing.assert_allclose(sampling.layer_probs("owl_reverse", 6, SCORES), (p.max() - p) / (p.max() - p).sum())
  np.testing.assert_allclose(sampling.layer_probs("owl", 6, np.zeros(6)), np.full(6, 1 / 6))   # no outliers
  with pytest.raises(ValueError, match="needs per-block scores"):
    sampling.layer_probs("owl", 6)


# ---------------------------------------------------------------------------------------------------------
# Steps and resampling, as the trainer runs them
# ---------------------------------------------------------------------------------------------------------
def _setup(config, model, trace_log=None, params=None):
  hook = get_hook(config.sampling.method)(config, model)
  params = hook.init_params(_init(model) if params is None else params, None)
  trainable, frozen = peft.split(params)
  tx, schedule = optim.make(config.optim, trainable, 100,
                            per_block=sampling.per_block_optimizers(config, trainable))
  entry = losses.get("nll")
  if trace_log is not None:
    def fn(*a):
      trace_log.append(1)                   # runs once per trace of the jitted step
      return losses.get("nll").fn(*a)
    entry = dataclasses.replace(entry, fn=fn)
  step = jax.jit(functools.partial(train_mod.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=entry, loss_cfg=config.loss), donate_argnums=(0,))
  state = train_mod.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(1))
  dev = jax.devices()[0]                     # committed, as the trainer's jit-initialised state
  return hook, tx, step, jax.device_put(state, dev), jax.device_put(frozen, dev)


def _lisa(gamma=2, interval=3):
  config = lisa_config.get_config("model=tiny,smoke")
  config.sampling.gamma = gamma
  config.sampling.interval_steps = interval
  config.optim.grad_clip_norm = 0.0
  return config


def _weights(state, frozen):
  return jax.device_get(peft.merge(peft.combine(state.params, frozen)))


def _state_leaves(opt_state):
  return {peft.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


def test_a_step_touches_only_the_sampled_blocks_and_resampling_resets_only_their_state():
  traces = []
  model = _model()
  hook, tx, step, state, frozen = _setup(_lisa(), model, traces)
  state, frozen = hook.refresh(0, state, frozen, tx)
  idx = peft.sampled_blocks(frozen)
  before = _weights(state, frozen)
  frozen_before = jax.device_get(frozen)
  state, _ = step(state, frozen, None, _batch())
  state, _ = step(state, frozen, None, _batch(seed=1))
  after = _weights(state, frozen)
  _tree_close(jax.device_get(frozen), frozen_before, rtol=0, atol=0)     # the step never writes the frozen tree
  for path, w in peft.flatten(after).items():
    w0 = peft.flatten(before)[path]
    if path.startswith("layers/"):
      others = np.setdiff1d(np.arange(L), idx)
      np.testing.assert_array_equal(w[others], w0[others], err_msg=path)  # unsampled blocks: bit-identical
      if path.endswith("kernel"):
        assert np.all(np.abs(w[idx] - w0[idx]).reshape(len(idx), -1).max(-1) > 0), path
    else:
      assert np.abs(w - w0).max() > 0, path
  # Optimizer state exists for gamma blocks only.
  leaves = _state_leaves(state.opt_state)
  assert all(x.shape[0] == 2 for p, x in leaves.items() if "slots" in p)

  # Resampling at step 3: lossless write-back, new slots gathered, slot state reset, the rest kept.
  old_leaves = leaves
  new_state, new_frozen = hook.refresh(3, state, frozen, tx)
  new_idx = peft.sampled_blocks(new_frozen)
  np.testing.assert_array_equal(new_idx, sampling.draw(0, 3, np.full(L, 1 / L), 2))
  _tree_close(_weights(new_state, new_frozen), after, rtol=0, atol=0)
  base = peft.flatten(jax.device_get(new_frozen))
  for path, slots in peft.flatten(jax.device_get(new_state.params)).items():
    if path.endswith("/slots"):
      np.testing.assert_array_equal(slots, base[path[:-len("slots")] + "base"][new_idx])
  new_leaves = _state_leaves(new_state.opt_state)
  slot_paths = [p for p in new_leaves if "slots" in p]
  assert slot_paths and all(np.all(new_leaves[p] == 0) for p in slot_paths)
  kept = [p for p in new_leaves if "embed" in p or "lm_head" in p]
  assert kept and all(np.array_equal(new_leaves[p], old_leaves[p]) and np.abs(old_leaves[p]).max() > 0 for p in kept)
  counts = {p: int(v) for p, v in new_leaves.items() if v.ndim == 0 and "count" in p}
  # The slots' Adam restarts its bias correction; their learning-rate schedule and AdamW's go on.
  assert counts == {"inner_states/adam/inner_state/0/count": 0, "inner_states/adam/inner_state/1/count": 2,
                    "inner_states/adamw/inner_state/0/count": 2, "inner_states/adamw/inner_state/2/count": 2}

  # Resampling never recompiles the jitted step (same shapes, dtypes and shardings).
  state, frozen, drawn = new_state, new_frozen, set()
  for s in range(3, 12):
    if s % 3 == 0:
      state, frozen = hook.refresh(s, state, frozen, tx)
      drawn.add(tuple(peft.sampled_blocks(frozen)))
    state, _ = step(state, frozen, None, _batch(seed=s))
  assert len(drawn) > 1                      # the slots really moved
  assert len(traces) == 1 and step._cache_size() == 1


def test_owlore_galore_slots_restart_with_fresh_projectors():
  config = owlore_config.get_config("model=tiny,smoke")
  config.sampling.method = "lisa"            # same optimizer layout, no calibration needed here
  config.sampling.prob_mode = "uniform"
  config.sampling.gamma = 2
  config.sampling.state = "reset"
  config.optim.galore.rank = 4
  config.optim.galore.update_proj_gap = 100
  model = _model()
  hook, tx, step, state, frozen = _setup(config, model)
  state, frozen = hook.refresh(0, state, frozen, tx)
  for s in range(2):
    state, _ = step(state, frozen, None, _batch(seed=s))
  proj = lambda st: [x for p, x in _state_leaves(st.opt_state).items() if "projector" in p and "q_proj" in p][0]
  assert np.abs(proj(state)).max() > 0 and proj(state).shape == (2, 64, 4)
  state, frozen = hook.refresh(3, state, frozen, tx)
  assert np.all(proj(state) == 0)            # count 0 again: the next step computes the projector
  w0 = _weights(state, frozen)
  state, _ = step(state, frozen, None, _batch(seed=5))
  idx = peft.sampled_blocks(frozen)
  q = lambda w: peft.flatten(w)["layers/attn/q_proj/kernel"][idx]
  assert np.abs(proj(state)).max() > 0 and np.abs(q(_weights(state, frozen)) - q(w0)).max() > 0


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------
def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _opt_bytes(config, model):
  hook = get_hook(config.sampling.method)(config, model) if config.get("sampling") else None
  def trainable():
    params = model.init(jax.random.PRNGKey(0))
    if hook is not None:
      params = peft.sample_layers(params, np.arange(config.sampling.gamma))
    return peft.split(params)[0]
  abstract = jax.eval_shape(trainable)
  tx, _ = optim.make(config.optim, abstract, 100)
  return _nbytes(jax.eval_shape(tx.init, abstract)), abstract


def test_optimizer_state_shrinks_as_accounted():
  model = _model(L=8)
  c = model.config
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  layer_numel = sum(x.size for x in jax.tree.leaves(shapes["layers"]))
  other_numel = sum(x.size for k, v in shapes.items() if k != "layers" for x in jax.tree.leaves(v))
  slack = 64                                   # int32 step counts

  full = lisa_config.get_config("model=tiny,smoke")
  del full.sampling
  full.optim.rules = ()
  full_bytes, _ = _opt_bytes(full, model)
  assert abs(full_bytes - 2 * 4 * (layer_numel + other_numel)) <= slack

  lisa = _lisa(gamma=2)
  lisa_bytes, _ = _opt_bytes(lisa, model)
  assert abs(lisa_bytes - 2 * 4 * (2 / 8 * layer_numel + other_numel)) <= slack

  owl = owlore_config.get_config("model=tiny,smoke")
  owl.sampling.gamma, owl.optim.galore.rank, owl.sampling.state = 3, 8, "reset"
  owl_bytes, _ = _opt_bytes(owl, model)
  D, F, hd = c.hidden_size, c.intermediate_size, c.dim_per_head
  kernels = [(D, c.num_heads * hd), (D, c.num_kv_heads * hd), (D, c.num_kv_heads * hd), (c.num_heads * hd, D),
             (D, F), (D, F), (F, D)]
  r = 8
  # GaLore `std` on a [in, out] kernel: moments r x max(in, out), projector r x min(in, out); norms: Adam.
  galore = sum(2 * r * max(i, o) + r * min(i, o) for i, o in kernels) + 2 * 2 * D
  assert abs(owl_bytes - 4 * (3 * galore + 2 * other_numel)) <= slack
  assert owl_bytes < lisa_bytes < full_bytes


# ---------------------------------------------------------------------------------------------------------
# Validation at hook construction
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("gamma", 0, r"gamma=0 must be an int in \[1, 4\]"),
    ("gamma", 5, r"gamma=5 must be an int in \[1, 4\]"),
    ("interval_steps", 0, "interval_steps"),
    ("prob_mode", "owl", "lisa takes prob_mode"),
    ("prob_mode", "zipf", "prob_mode='zipf'; valid"),
    ("method", "lisaa", "unknown layer-sampling method 'lisaa'"),
])
def test_bad_sampling_configs_fail_at_hook_construction(field, value, match):
  config = _lisa()
  config.sampling[field] = value
  with pytest.raises(ValueError, match=match):
    optim.sampling_hook(config, _model())


def test_slots_sharing_an_optimizer_fail_with_the_fix():
  config = _lisa()
  config.optim.rules = ()
  with pytest.raises(ValueError, match="slots need an optimizer that no other parameter uses"):
    get_hook("lisa")(config, _model())
  config.optim.rules = ((r"layers/.*/slots", None), (".*", "adamw"))
  with pytest.raises(ValueError, match="freezes some slots"):
    get_hook("lisa")(config, _model())


def test_zero_probability_blocks_fewer_than_gamma_fail():
  config = _lisa(gamma=4)
  config.sampling.method, config.sampling.prob_mode = "owlore_alpha", "owl_reverse"
  config.sampling.eigs_thresh = 8
  hook = get_hook("owlore_alpha")(config, _model())
  with pytest.raises(ValueError, match="fewer than gamma=4"):
    hook.init_params(_init(_model()), None)


def test_owlore_draws_from_the_outlier_ratios_of_the_starting_weights():
  import diagnostics
  config = owlore_config.get_config("model=tiny,smoke")
  config.sampling.gamma, config.sampling.outlier_M = 2, 3.0
  config.sampling.calibration_sequences, config.sampling.calibration_batch_size = 6, 4
  model = _model(L=6)
  params = _init(model)
  hook = get_hook("owlore")(config, model)
  frozen = peft.split(hook.init_params(params, None))[1]
  sc = sampling.SamplingConfig.from_config(config, 6)
  batches = sampling.calibration_batches(config, sc)
  assert [b["inputs"].shape for b in batches] == [(4, config.seq_len), (2, config.seq_len)]
  d = diagnostics.outlier_ratios(model, params, batches, 3.0)
  p = d / d.sum()
  assert np.ptp(p) > 0.01
  np.testing.assert_array_equal(peft.sampled_blocks(frozen), sampling.draw(config.seed, 0, p, 2))
