"""Gradient entanglement (diagnostics/_entanglement.py) on a tiny decoder: the statistics equal explicit
per-pair `jax.grad` computations (full fine-tuning and LoRA), identical chosen and rejected give cosine 1,
the indicators follow METHODS D1 on constructed vectors, and the first-order prediction of D1 matches the
change of log-probs after a small margin-loss step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diagnostics
import models
import peft
from losses import model_outputs

N, T, V = 3, 8, 32


@pytest.fixture(scope="module")
def setup():
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=V, num_layers=1))
  params = model.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, size=(N, 2, T + 1))
  tokens[:, :, :3] = tokens[:, :1, :3]                           # a shared prompt of 3 tokens
  mask = np.zeros((N, 2, T), np.float32)
  mask[:, :, 2:] = 1.0                                           # completion: targets after the prompt
  batch = {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:]),
           "loss_mask": jnp.asarray(mask),
           "positions": jnp.broadcast_to(jnp.arange(T), (N, 2, T)),
           "segment_ids": jnp.ones((N, 2, T), jnp.int32)}
  return model, params, batch


def _explicit(model, trainable, frozen, batch):
  """[N, 2, P] float64: ∇ logπ(sequence k of pair i) w.r.t. the trainable tree, one jax.grad per sequence."""
  @jax.jit
  def grad_k(t, ex, k):
    return jax.grad(lambda t: model_outputs(model, peft.combine(t, frozen), ex)["logps"][0, k])(t)

  flat = lambda g: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
  return np.stack([[flat(grad_k(trainable, jax.tree.map(lambda x: x[i:i + 1], batch), k)) for k in (0, 1)]
                   for i in range(batch["inputs"].shape[0])])


@pytest.mark.parametrize("adapter", [False, True])
def test_matches_per_pair_grads(setup, adapter):
  model, params, batch = setup
  if adapter:
    params = peft.apply(params, {"all-linear": peft.AdapterSpec(method="lora", rank=2, init="gaussian")})
  trainable, frozen = peft.split(params)
  out = diagnostics.entanglement(model, trainable, frozen, batch, n_pairs=N, per_pair=True)
  dots, nws, nls, coss = [], [], [], []
  for gw, gl in _explicit(model, trainable, frozen, batch):
    dots.append(gw @ gl)
    nws.append(gw @ gw)
    nls.append(gl @ gl)
    coss.append(gw @ gl / np.sqrt(gw @ gw * (gl @ gl)))
  pp = out["per_pair"]
  np.testing.assert_allclose(pp["dot"], dots, rtol=1e-4)
  np.testing.assert_allclose(pp["norm_sq_chosen"], nws, rtol=1e-4)
  np.testing.assert_allclose(pp["norm_sq_rejected"], nls, rtol=1e-4)
  np.testing.assert_allclose(pp["cosine"], coss, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["entanglement/dot"], np.mean(dots), rtol=1e-4)
  np.testing.assert_allclose(out["entanglement/cosine"], np.mean(coss), rtol=1e-4, atol=1e-6)
  falls = np.mean(np.asarray(dots) > np.asarray(nws))
  rises = np.mean(np.asarray(dots) > np.asarray(nls))
  np.testing.assert_allclose(out["entanglement/chosen_falls"], falls)
  np.testing.assert_allclose(out["entanglement/rejected_rises"], rises)
  # Distinct sequences: not collinear, so the test above is not trivially satisfied.
  assert np.all(np.abs(coss) < 0.999)


def test_n_pairs_selects_leading_pairs(setup):
  model, params, batch = setup
  trainable, frozen = peft.split(params)
  all_pairs = diagnostics.entanglement(model, trainable, frozen, batch, n_pairs=N, per_pair=True)
  two = diagnostics.entanglement(model, trainable, frozen, batch, n_pairs=2)
  np.testing.assert_allclose(two["entanglement/norm_sq_chosen"],
                             np.mean(all_pairs["per_pair"]["norm_sq_chosen"][:2]), rtol=1e-5)


def test_identical_sequences_cosine_one(setup):
  model, params, batch = setup
  same = {k: jnp.concatenate([v[:, :1], v[:, :1]], axis=1) for k, v in batch.items()}
  trainable, frozen = peft.split(params)
  out = diagnostics.entanglement(model, trainable, frozen, same, n_pairs=2)
  np.testing.assert_allclose(out["entanglement/cosine"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["entanglement/dot"], out["entanglement/norm_sq_chosen"], rtol=1e-5)
  np.testing.assert_allclose(out["entanglement/norm_sq_rejected"], out["entanglement/norm_sq_chosen"],
                             rtol=1e-5)


@pytest.mark.parametrize("g_w,g_l,d_ratio,falls,rises", [
    ([1.0, 0.0], [2.0, 0.0], 1.0, 1.0, 0.0),     # <.,.> = 2 > |g_w|^2 = 1; < |g_l|^2 = 4
    ([2.0, 0.0], [1.0, 0.0], 1.0, 0.0, 1.0),     # 2 < 4; 2 > 1
    ([1.0, 0.0], [0.0, 1.0], 1.0, 0.0, 0.0),     # orthogonal: margin losses move them independently
    ([1.0, 1.0], [1.0, 1.0], 1.0, 0.0, 0.0),     # equal: exactly on the boundary, strict inequality
    ([1.0, 0.0], [2.0, 0.0], 3.0, 0.0, 1.0),     # d_w = 3 d_l: 2 < 3 * 1; 2 > 4 / 3
    ([2.0, 0.0], [-1.0, 1.0], 1.0, 0.0, 0.0),    # anti-aligned: both move the right way
])
def test_indicators_on_vectors(g_w, g_l, d_ratio, falls, rises):
  s = diagnostics.pair_stats({"w": jnp.asarray(g_w)}, {"w": jnp.asarray(g_l)}, d_ratio)
  assert float(s["chosen_falls"]) == falls and float(s["rejected_rises"]) == rises
  gw, gl = np.asarray(g_w), np.asarray(g_l)
  np.testing.assert_allclose(s["cosine"], gw @ gl / np.linalg.norm(gw) / np.linalg.norm(gl), rtol=1e-6)


def test_first_order_prediction(setup):
  """One SGD step on -(logπ_w - logπ_l) (d_w = d_l = 1) of pair 0 moves logπ(y_w) by ≈ η(|g_w|² - <g_w,g_l>)
  and logπ(y_l) by ≈ η(<g_w,g_l> - |g_l|²), as D1 says."""
  model, params, batch = setup
  trainable, frozen = peft.split(params)
  ex = jax.tree.map(lambda x: x[:1], batch)
  s = diagnostics.entanglement(model, trainable, frozen, ex, n_pairs=1)
  logps = jax.jit(lambda t: model_outputs(model, peft.combine(t, frozen), ex)["logps"][0])
  g = jax.jit(jax.grad(lambda t: -(logps(t)[0] - logps(t)[1])))(trainable)
  eta = 1e-3 / float(s["entanglement/norm_sq_chosen"] + s["entanglement/norm_sq_rejected"])
  stepped = jax.tree.map(lambda p, d: p - eta * d, trainable, g)
  delta = np.asarray(logps(stepped), np.float64) - np.asarray(logps(trainable), np.float64)
  dot, nw, nl = (float(s[f"entanglement/{k}"]) for k in ("dot", "norm_sq_chosen", "norm_sq_rejected"))
  np.testing.assert_allclose(delta, [eta * (nw - dot), eta * (dot - nl)], rtol=0.05, atol=2e-5)


def test_trainer_logs_entanglement_on_demand(tmp_path):
  import json
  import os
  import train_lib
  from configs import dpo
  config = dpo.get_config("model=tiny,smoke")
  config.entanglement_every_steps = 4
  config.eval_before = False
  train_lib.train_and_evaluate(config, str(tmp_path))
  recs = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  logged = [r for r in recs if "entanglement/cosine" in r]
  assert [r["step"] for r in logged] == [0, 4]
  assert all(-1.0 <= r["entanglement/cosine"] <= 1.0 and r["entanglement/norm_sq_chosen"] > 0 for r in logged)
