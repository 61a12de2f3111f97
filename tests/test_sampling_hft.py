"""HFT (`peft/_sampling.py`): the per-stage selection rule, frozen halves untouched by a real train step (weights
and Adam state bit-identical), and clipping on the trained half only."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losses
import models
import peft
from configs import hft as hft_config
from optim import _hft as sampling
from hooks import get_hook
import optim
from train_lib import train as train_mod

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("L", [1, 6, 7])
def test_selection_rule(L):
  sel = sampling.hft_selection(0, 0, L)
  assert set(sel) == set(ATTN + MLP) and all(v.shape == (L,) and v.dtype == bool for v in sel.values())
  attn = sum(sel[n].astype(int) for n in ATTN)
  mlp = sum(sel[n].astype(int) for n in MLP)
  assert np.all(attn == 2)                                   # 2 of 4 attention matrices in every block
  assert sorted(mlp) == [1] * (L - L // 2) + [2] * (L // 2)  # 2 of 3 MLP matrices in half the blocks
  again = sampling.hft_selection(0, 0, L)
  assert all(np.array_equal(sel[n], again[n]) for n in sel)  # a function of (seed, step)


def test_stages_differ_and_every_matrix_gets_its_turn():
  stages = [sampling.hft_selection(0, s, 6) for s in range(0, 400, 20)]
  keys = {tuple(np.concatenate([st[n] for n in ATTN + MLP])) for st in stages}
  assert len(keys) == len(stages)
  trained = np.mean([np.concatenate([st[n] for n in ATTN + MLP]) for st in stages], axis=0)
  assert np.all(trained > 0.2) and np.all(trained < 0.8)


def _batch(V, B=4, T=12, seed=0):
  t = jax.random.randint(jax.random.PRNGKey(seed), (B, 1, T + 1), 3, V)
  return {"inputs": t[..., :-1], "targets": t[..., 1:], "loss_mask": jnp.ones((B, 1, T)),
          "positions": jnp.broadcast_to(jnp.arange(T), (B, 1, T)), "segment_ids": jnp.ones((B, 1, T), jnp.int32)}


def _mu_nu(opt_state):
  """{param path: (mu, nu)} of the AdamW inside the HFT transform."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  return {p: (np.asarray(m), np.asarray(v)) for (p, m), v in
          zip(peft.flatten(adam.mu).items(), peft.flatten(adam.nu).values())}


def test_a_step_leaves_the_frozen_half_and_its_state_untouched():
  V, L = 61, 4
  config = hft_config.get_config("model=tiny,smoke")
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=V, num_layers=L))
  hook = get_hook("hft")(config, model)
  params = hook.init_params(jax.jit(model.init)(jax.random.PRNGKey(0)), None)
  trainable, frozen = peft.split(params)
  tx, schedule = optim.make(config.optim, trainable, 100)
  step = jax.jit(functools.partial(train_mod.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=losses.get("nll"), loss_cfg=config.loss))
  state = train_mod.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(1))
  state, _ = step(state, frozen, None, _batch(V))            # stage -1: everything trains (moments nonzero)
  state, frozen = hook.refresh(4, state, frozen, tx)
  sel = sampling.hft_selection(config.seed, 4, L)
  w0, s0 = peft.flatten(jax.device_get(state.params)), _mu_nu(state.opt_state)
  state, _ = step(state, frozen, None, _batch(V, seed=1))
  w1, s1 = peft.flatten(jax.device_get(state.params)), _mu_nu(state.opt_state)
  for path in w0:
    changed = np.abs(w1[path] - w0[path]).reshape(w0[path].shape[0], -1).max(-1) > 0
    moved = np.abs(s1[path][0] - s0[path][0]).reshape(w0[path].shape[0], -1).max(-1) > 0
    name = path.split("/")[-2]
    if name in sel and path.startswith("layers/"):
      np.testing.assert_array_equal(changed, sel[name], err_msg=path)    # frozen layers: bit-identical
      np.testing.assert_array_equal(moved, sel[name], err_msg=path)      # ... and so are their moments
      np.testing.assert_array_equal(s1[path][1][~sel[name]], s0[path][1][~sel[name]], err_msg=path)
    elif path.startswith("layers/"):
      assert changed.all() and moved.all(), path                        # norms train in every block
    else:
      assert changed.any() and moved.any(), path                        # embeddings (seen rows), head


def test_clipping_sees_only_the_trained_half():
  L = 4
  rng = np.random.default_rng(0)
  params = {"layers": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(L, 3, 5)))}}},
            "embed": {"embedding": jnp.asarray(rng.normal(size=(7, 3)))}}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 10), params)
  tx = sampling.hft(optax.sgd(1.0), clip_norm=0.5)
  state = tx.init(params)
  sel = {n: np.zeros(L, bool) for n in ATTN + MLP}
  sel["q_proj"][[0, 2]] = True
  state = sampling.set_hft_selection(state, sel)
  updates, _ = tx.update(grads, state, params)
  g_q = np.asarray(grads["layers"]["attn"]["q_proj"]["kernel"]) * sel["q_proj"][:, None, None]
  g_e = np.asarray(grads["embed"]["embedding"])
  scale = 0.5 / np.sqrt(np.sum(g_q ** 2) + np.sum(g_e ** 2))
  np.testing.assert_allclose(updates["layers"]["attn"]["q_proj"]["kernel"], -scale * g_q, rtol=1e-5)
  np.testing.assert_allclose(updates["embed"]["embedding"], -scale * g_e, rtol=1e-5)


def test_hft_needs_its_optimizer_and_inner_clipping():
  model = models.Decoder(models.DecoderConfig.tiny(num_layers=2))
  config = hft_config.get_config("model=tiny,smoke")
  config.optim.name = "adamw"
  with pytest.raises(ValueError, match="needs config.optim.name='hft'"):
    get_hook("hft")(config, model)
  config = hft_config.get_config("model=tiny,smoke")
  config.optim.grad_clip_norm = 1.0
  with pytest.raises(ValueError, match="hft_clip_norm"):
    get_hook("hft")(config, model)
