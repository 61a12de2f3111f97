"""SFT variants (losses/_sft_variants.py): DFT, Anchored SFT, Aligned SFT, PoFT, confidence-limited CE.

Values and gradients against hand numpy evaluations of the formulas on random logits, then each registered
loss (except PoFT, whose aligned log-probs come from the data) through `train_and_evaluate` on the tiny
SFT smoke config."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
import train_lib
from configs import sft

B, T, V = 3, 5, 7


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _data(seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(B, 1, T, V))).astype(np.float32)
  targets = rng.integers(0, V, size=(B, 1, T))
  mask = (rng.random((B, 1, T)) < 0.7).astype(np.float32)
  mask[0, 0, 0] = 1.0
  return logits, targets, mask


def _outputs(logits, targets, mask):
  """The Outputs dict the trainer builds (train_lib.train.model_outputs), from logits."""
  lp_all = jax.nn.log_softmax(logits, axis=-1)
  tok = jnp.take_along_axis(lp_all, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  return {"token_logps": tok, "mask": jnp.asarray(mask), "logps": (tok * mask).sum(-1),
          "lengths": jnp.asarray(mask).sum(-1), "logits": logits}


def _loss_of_logits(name, targets, mask, cfg, batch=None, reference=None):
  fn = losses.get(name).fn
  return lambda logits: fn(_outputs(logits, targets, mask), reference, batch or {}, cfg)


# ---- DFT ----------------------------------------------------------------------------------------------
def test_dft_value_and_gradient():
  logits, targets, mask = _data()
  lp = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  p, n = np.exp(lp), mask.sum()
  want = np.sum(-p * lp * mask) / n
  loss, metrics = _loss_of_logits("dft", targets, mask, _cfg())(jnp.asarray(logits))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["nll"], np.sum(-lp * mask) / n, rtol=1e-5)

  # d/dlogits of -sg(p) log p = -p (onehot(y) - softmax): p is a constant weight on the CE gradient.
  g = jax.grad(lambda x: _loss_of_logits("dft", targets, mask, _cfg())(x)[0])(jnp.asarray(logits))
  onehot = np.eye(V)[targets]
  soft = np.exp(_np_log_softmax(logits.astype(np.float64)))
  want_g = -(p * mask)[..., None] * (onehot - soft) / n
  np.testing.assert_allclose(g, want_g, atol=1e-6)
  # Without the stop-gradient the weight would be p(1 + log p): make sure that differs here.
  assert np.abs(want_g - want_g * (1 + lp)[..., None]).max() > 1e-3


# ---- Anchored SFT ------------------------------------------------------------------------------------
def test_anchored_sft_kl_over_vocabulary():
  logits, targets, mask = _data(1)
  ref_logits, _, _ = _data(2)
  reference = _outputs(jnp.asarray(ref_logits), targets, mask)
  cfg = _cfg(kl_weight=0.1)
  loss, m = _loss_of_logits("anchored_sft", targets, mask, cfg, reference=reference)(jnp.asarray(logits))
  lq = _np_log_softmax(ref_logits.astype(np.float64))
  lpol = _np_log_softmax(logits.astype(np.float64))
  kl_tok = np.sum(np.exp(lq) * (lq - lpol), -1)                  # KL(ref || policy) per token
  kl = np.sum(kl_tok * mask) / mask.sum()
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
  dft, _ = _loss_of_logits("dft", targets, mask, _cfg())(jnp.asarray(logits))
  np.testing.assert_allclose(loss, dft + 0.1 * kl, rtol=1e-5)
  # The reverse direction would be a different number: the test pins the direction.
  kl_rev = np.sum(np.sum(np.exp(lpol) * (lpol - lq), -1) * mask) / mask.sum()
  assert abs(kl_rev - kl) > 1e-2
  # Policy == reference: no KL, and the reference gets no gradient.
  same = _outputs(jnp.asarray(logits), targets, mask)
  _, m0 = _loss_of_logits("anchored_sft", targets, mask, cfg, reference=same)(jnp.asarray(logits))
  assert abs(float(m0["kl"])) < 1e-6
  g_ref = jax.grad(lambda r: losses.get("anchored_sft").fn(_outputs(jnp.asarray(logits), targets, mask),
                                                   _outputs(r, targets, mask), {}, cfg)[0])(jnp.asarray(ref_logits))
  assert np.abs(g_ref).max() == 0.0


def test_asft_is_ambiguous_and_refused():
  with pytest.raises(ValueError, match="anchored_sft.*aligned_sft"):
    losses.get("asft")
  assert "asft" not in losses.names()


# ---- Aligned SFT ------------------------------------------------------------------------------------
def _pair_outputs(seed, lengths_differ=True):
  rng = np.random.default_rng(seed)
  tlp = -rng.uniform(0.05, 1.5, size=(B, 2, T))
  mask = np.ones((B, 2, T))
  if lengths_differ:
    mask[:, 1, -2:] = 0.0
  return tlp, mask


def _aligned_sft_f64(tlp, mask, lam, length_normalize):
  """Direct float64 evaluation: NLL(y_w) - lam [log σ(r_w) + log σ(-r_l)], r = log(p / (1 - p))."""
  lp = (tlp * mask).sum(-1)
  if length_normalize:
    lp = lp / mask.sum(-1)
  p = np.exp(lp)
  r = np.log(p) - np.log1p(-p)
  log_sig = lambda z: -np.log1p(np.exp(-z))
  nll = np.sum(-tlp[:, 0] * mask[:, 0]) / mask[:, 0].sum()
  return nll - lam * np.mean(log_sig(r[:, 0]) + log_sig(-r[:, 1]))


@pytest.mark.parametrize("length_normalize", [True, False])
def test_aligned_sft_formula(length_normalize):
  tlp, mask = _pair_outputs(11)
  lam = 0.3
  cfg = _cfg(beta=lam, length_normalize=length_normalize)

  def f(t):
    m = jnp.asarray(mask, jnp.float32)
    pol = {"token_logps": t, "mask": m, "logps": (t * m).sum(-1), "lengths": m.sum(-1)}
    return losses.get("aligned_sft").fn(pol, None, {}, cfg)

  loss, m = f(jnp.asarray(tlp, jnp.float32))
  np.testing.assert_allclose(loss, _aligned_sft_f64(tlp, mask, lam, length_normalize), rtol=1e-5)
  # The gradient of the formula, by central differences in float64, on a few token log-probs.
  g = np.asarray(jax.grad(lambda t: f(t)[0])(jnp.asarray(tlp, jnp.float32)))
  for idx in [(0, 0, 0), (1, 1, 2), (2, 1, T - 1), (2, 0, 3)]:
    e = np.zeros_like(tlp)
    e[idx] = 1e-6
    fd = (_aligned_sft_f64(tlp + e, mask, lam, length_normalize)
          - _aligned_sft_f64(tlp - e, mask, lam, length_normalize)) / 2e-6
    np.testing.assert_allclose(g[idx], fd, rtol=1e-3, atol=1e-6)
  # Absolute likelihood, not a margin: raising both responses' log-probs by the same amount changes it
  # (a Bradley–Terry loss such as DPO's would not move).
  shifted, _ = f(jnp.asarray(tlp + 0.05 * mask, jnp.float32))
  assert abs(float(shifted) - float(loss)) > 1e-3


def test_aligned_sft_finite_at_certainty():
  tlp, mask = _pair_outputs(12, lengths_differ=False)
  tlp[:, 0] = 0.0      # the chosen response has p = 1
  m = jnp.asarray(mask, jnp.float32)
  t = jnp.asarray(tlp, jnp.float32)
  pol = {"token_logps": t, "mask": m, "logps": (t * m).sum(-1), "lengths": m.sum(-1)}
  loss, _ = losses.get("aligned_sft").fn(pol, None, {}, _cfg())
  g = jax.grad(lambda lp: losses.get("aligned_sft").fn({**pol, "logps": lp}, None, {}, _cfg())[0])(pol["logps"])
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))


# ---- PoFT ---------------------------------------------------------------------------------------------
def test_poft_formula():
  logits, targets, mask = _data(3)
  M = 3
  aligned = np.random.default_rng(4).normal(-6.0, 2.0, size=(B, 1, M)).astype(np.float32)
  beta = 0.5
  pol = _outputs(jnp.asarray(logits), targets, mask)
  loss, m = losses.get("poft").fn(pol, None, {"aligned_logps": jnp.asarray(aligned)}, _cfg(beta=beta))
  lp = np.asarray(pol["logps"], np.float64)[..., None]              # [B, 1, 1]
  z = beta * (lp - aligned)
  want = np.mean(np.log1p(np.exp(-z)))                             # -log sigma(z)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["poft/margin"], z.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="aligned_logps"):
    losses.get("poft").fn(pol, None, {}, _cfg(beta=beta))


# ---- confidence-limited ---------------------------------------------------------------------------------
def test_conf_limited_cap_zero_gradient_above_cap():
  logits, targets, mask = _data(5)
  mask[:] = 1.0
  # Make the targets of a few tokens near-certain (p > 0.99).
  sure = np.zeros((B, 1, T), bool)
  sure[0, 0, 1] = sure[1, 0, 3] = sure[2, 0, 0] = True
  logits = logits.copy()
  np.put_along_axis(logits, targets[..., None], np.where(sure, 20.0, 0.0)[..., None]
                    + np.take_along_axis(logits, targets[..., None], -1), -1)
  cap = 0.9
  lp = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  above = np.exp(lp) >= cap
  assert above[sure].all() and above.sum() < above.size
  f = _loss_of_logits("conf_limited", targets, mask, _cfg(max_confidence=cap))
  loss, m = f(jnp.asarray(logits))
  n = mask.sum()
  np.testing.assert_allclose(loss, np.sum(-lp * ~above) / n, rtol=1e-5)
  np.testing.assert_allclose(m["capped_fraction"], above.mean(), rtol=1e-6)
  g = np.asarray(jax.grad(lambda x: f(x)[0])(jnp.asarray(logits)))
  assert np.abs(g[above]).max() == 0.0
  # Tokens below the cap get plain CE gradients: softmax - onehot, over all completion tokens.
  soft = np.exp(_np_log_softmax(logits.astype(np.float64)))
  want = (soft - np.eye(V)[targets]) / n
  np.testing.assert_allclose(g[~above], want[~above], atol=1e-6)


def test_conf_limited_pass_at_n():
  logits, targets, mask = _data(6, scale=0.5)
  pol = _outputs(jnp.asarray(logits), targets, mask)
  n = 4
  f = lambda seq_lp: losses.get("conf_limited").fn({**pol, "logps": seq_lp}, None, {},
                                                   _cfg(form="pass_at_n", n=n))[0]
  seq_lp = np.asarray(pol["logps"], np.float64)
  p = np.exp(seq_lp)
  np.testing.assert_allclose(f(pol["logps"]), np.mean(-np.log(1 - (1 - p) ** n)), rtol=1e-5)
  # d/dlogp = -n (1-p)^(n-1) p / (1 - (1-p)^n): CE's -1 scaled down as p grows.
  g = np.asarray(jax.grad(f)(pol["logps"]))
  np.testing.assert_allclose(g, -n * (1 - p) ** (n - 1) * p / (1 - (1 - p) ** n) / B, rtol=1e-4)
  f1 = lambda s: losses.get("conf_limited").fn({**pol, "logps": s}, None, {}, _cfg(form="pass_at_n", n=1))[0]
  np.testing.assert_allclose(f1(pol["logps"]), -seq_lp.mean(), rtol=1e-5)


# ---- end to end ---------------------------------------------------------------------------------------
def _train(tmp_path, loss, peft_method=None):
  c = sft.get_config("model=tiny,smoke")
  c.unlock()
  c.loss = ml_collections.ConfigDict(loss)
  if peft_method:
    c.peft.method = peft_method
    c.peft.targets = "all-linear"
  c.eval_before = False
  c.eval.num_examples = 0
  c.total_steps = 4
  c.checkpoint_every_steps = 4
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  records = [json.loads(l) for l in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  assert train and all(np.isfinite(r["loss"]) for r in train)
  return summary, train


@pytest.mark.slow
@pytest.mark.parametrize("loss,key", [(dict(name="dft"), "dft"),
                                      (dict(name="conf_limited", max_confidence=0.5), "capped_fraction")])
def test_trains_end_to_end(tmp_path, loss, key):
  _, train = _train(tmp_path, loss)
  assert key in train[-1]


@pytest.mark.slow
def test_anchored_sft_trains_with_adapter_reference(tmp_path):
  _, train = _train(tmp_path, dict(name="anchored_sft", kl_weight=0.1), peft_method="lora")
  # LoRA starts at B = 0, so the policy starts equal to the stripped base (KL 0) and moves away from it.
  assert train[-1]["kl"] > 0.0
  assert train[-1]["loss"] == pytest.approx(train[-1]["dft"] + 0.1 * train[-1]["kl"], rel=1e-4)
