"""DPO-Kernels: kernels and divergences against their closed forms, identities, and the loss's two modes."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
from losses import _divergences as dv
from losses import _dpo_kernels as dk
from losses import _kernels as kr

D = 5


def _emb(seed, n=4, scale=0.6):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, D)) * scale, rng.normal(size=(n, D)) * scale


def _probs(seed, shape=(3, 9), scale=1.5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape) * scale
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return logp, np.exp(logp)


# ------------------------------------------------------------------------------------------------
# Kernels.
# ------------------------------------------------------------------------------------------------
def test_polynomial_closed_form():
  x, y = _emb(0)
  with jax.enable_x64(True):
    got = kr.log_polynomial(jnp.asarray(x), jnp.asarray(y), c=1.5, degree=3)
  np.testing.assert_allclose(got, np.log(((x * y).sum(-1) + 1.5) ** 3), rtol=1e-12)


def test_rbf_closed_form():
  x, y = _emb(1)
  with jax.enable_x64(True):
    got = kr.log_rbf(jnp.asarray(x), jnp.asarray(y), sigma=0.7)
  np.testing.assert_allclose(got, np.log(np.exp(-((x - y) ** 2).sum(-1) / (2 * 0.7 ** 2))), rtol=1e-12)


def test_spectral_closed_form():
  x, y = _emb(2)
  lam, a = (1.0, 0.5, 0.2), (1.0, 0.1, 3.0)
  with jax.enable_x64(True):
    got = kr.log_spectral(jnp.asarray(x), jnp.asarray(y), lam, a)
  d2 = ((x - y) ** 2).sum(-1)
  want = np.log(sum(l * np.exp(-ai * d2) for l, ai in zip(lam, a)))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_mahalanobis_closed_form_and_positive_definite():
  x, y = _emb(3)
  rng = np.random.default_rng(3)
  chol = rng.normal(size=(D, D))  # the upper triangle must be ignored
  lower = np.tril(chol)
  precision = lower @ lower.T + 1e-3 * np.eye(D)
  with jax.enable_x64(True):
    got = kr.log_mahalanobis(jnp.asarray(x), jnp.asarray(y), jnp.asarray(chol), eps=1e-3)
    s = np.asarray(kr.mahalanobis_precision(jnp.asarray(chol), eps=1e-3))
  d = x - y
  np.testing.assert_allclose(got, -0.5 * np.einsum("bi,ij,bj->b", d, precision, d), rtol=1e-12)
  np.testing.assert_allclose(s, precision, rtol=1e-12)
  assert np.linalg.eigvalsh(s).min() >= 1e-3 * (1 - 1e-9)


def test_mahalanobis_with_identity_is_rbf_sigma_one():
  x, y = _emb(4)
  with jax.enable_x64(True):
    maha = kr.log_mahalanobis(jnp.asarray(x), jnp.asarray(y), jnp.eye(D), eps=0.0)
    rbf = kr.log_rbf(jnp.asarray(x), jnp.asarray(y), sigma=1.0)
  np.testing.assert_allclose(maha, rbf, rtol=1e-14)


def test_hmk_weights_start_at_one_half_and_mixture_closed_form():
  params = kr.init_hmk_params(D)
  for name, w in kr.hmk_weights(params).items():
    assert float(w) == 0.5, name
  assert float(kr.hmk_entropy(params)) == pytest.approx(3 * math.log(2), rel=1e-6)
  x, y = _emb(5)
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    p = kr.init_hmk_params(D, dtype=jnp.float64)
    p.update(top_logits=jnp.asarray([0.3, -0.2]), local_logits=jnp.asarray([-1.0, 0.4]),
             global_logits=jnp.asarray([0.7, 0.1]), maha_chol=jnp.asarray(np.tril(rng.normal(size=(D, D)))))
    got = kr.log_hmk(jnp.asarray(x), jnp.asarray(y), p, degree=2, maha_eps=1e-6)
  sm = lambda v: np.exp(v) / np.exp(v).sum()
  tau, wl, wg = sm(np.array([0.3, -0.2])), sm(np.array([-1.0, 0.4])), sm(np.array([0.7, 0.1]))
  d = x - y
  d2 = (d ** 2).sum(-1)
  L = np.asarray(p["maha_chol"])
  k_rbf = np.exp(-d2 / 2.0)
  k_poly = ((x * y).sum(-1) + 1.0) ** 2
  k_spec = 1.0 * np.exp(-1.0 * d2) + 0.5 * np.exp(-0.1 * d2)
  k_maha = np.exp(-0.5 * np.einsum("bi,ij,bj->b", d, L @ L.T + 1e-6 * np.eye(D), d))
  want = tau[0] * (wl[0] * k_rbf + wl[1] * k_poly) + tau[1] * (wg[0] * k_spec + wg[1] * k_maha)
  np.testing.assert_allclose(got, np.log(want), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Divergences.
# ------------------------------------------------------------------------------------------------
def _div(name, logp, logq, **kw):
  with jax.enable_x64(True):
    return np.asarray(dv.divergence(name, jnp.asarray(logp), jnp.asarray(logq), **kw))


def test_divergences_closed_forms():
  logp, p = _probs(10)
  logq, q = _probs(11)
  m = 0.5 * (p + q)
  closed = {
      "kl": (p * np.log(p / q)).sum(-1),
      "js": 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1),
      "hellinger": 0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1),
      "bhattacharyya": -np.log(np.sqrt(p * q).sum(-1)),
  }
  for name, want in closed.items():
    np.testing.assert_allclose(_div(name, logp, logq), want, rtol=1e-12, err_msg=name)
  for a in (0.5, 1.01, 2.0):
    want = np.log((p ** a * q ** (1 - a)).sum(-1)) / (a - 1)
    np.testing.assert_allclose(_div("renyi", logp, logq, renyi_a=a), want, rtol=1e-12)
  pearson = lambda t: (t - 1.0) ** 2
  np.testing.assert_allclose(_div("f", logp, logq, f=pearson), (q * ((p / q) - 1) ** 2).sum(-1),
                             rtol=1e-12)


def test_divergence_argument_order_is_policy_then_reference():
  logp, p = _probs(12)
  logq, q = _probs(13)
  assert not np.allclose(_div("kl", logp, logq), _div("kl", logq, logp))
  np.testing.assert_allclose(_div("kl", logp, logq), (p * (logp - logq)).sum(-1), rtol=1e-12)


def test_divergence_identities():
  logp, _ = _probs(14)
  logq, _ = _probs(15)
  h2 = _div("hellinger", logp, logq)
  np.testing.assert_allclose(_div("bhattacharyya", logp, logq), -np.log(1.0 - h2), rtol=1e-10)
  kl = _div("kl", logp, logq)
  np.testing.assert_allclose(_div("renyi", logp, logq, renyi_a=1.0), kl, rtol=1e-14)
  for a, tol in ((1.01, 3e-2), (1.0001, 3e-4), (0.9999, 3e-4)):
    np.testing.assert_allclose(_div("renyi", logp, logq, renyi_a=a), kl, rtol=tol)
  np.testing.assert_allclose(_div("f", logp, logq, f=lambda t: t * jnp.log(t)), kl, rtol=1e-12)
  js_pq, js_qp = _div("js", logp, logq), _div("js", logq, logp)
  np.testing.assert_allclose(js_pq, js_qp, rtol=1e-13)
  assert np.all(js_pq > 0) and np.all(js_pq <= math.log(2))
  # Nearly disjoint supports: JS approaches, and stays below, log 2.
  far_p = np.log(np.array([[1 - 1e-9, 1e-9 / 2, 1e-9 / 2]]))
  far_q = np.log(np.array([[1e-9 / 2, 1e-9 / 2, 1 - 1e-9]]))
  js_far = _div("js", far_p, far_q)
  assert math.log(2) - 1e-6 < js_far[0] <= math.log(2)


def test_wasserstein_discrete_metric_is_total_variation():
  logp, p = _probs(16, shape=(3, 12))
  logq, q = _probs(17, shape=(3, 12))
  got = _div("wasserstein", logp, logq, k=12)
  np.testing.assert_allclose(got, 0.5 * np.abs(p - q).sum(-1), rtol=2e-3)  # entropic bias


def test_wasserstein_one_dimensional_costs_match_exact_w1():
  """Tokens embedded on a line: exact W1 = integral |F_p - F_q|, here on the renormalised top-k."""
  v, k = 24, 16
  logp, p = _probs(18, shape=(2, v), scale=2.0)
  logq, q = _probs(19, shape=(2, v), scale=2.0)
  pos = np.random.default_rng(20).normal(size=(v, 1))
  got = _div("wasserstein", logp, logq, k=k, token_embeddings=pos)
  want = []
  for b in range(2):
    support = np.argsort(-np.maximum(p[b], q[b]))[:k]
    ps, qs = p[b, support] / p[b, support].sum(), q[b, support] / q[b, support].sum()
    order = np.argsort(pos[support, 0])
    x = pos[support, 0][order]
    cdf_gap = np.abs(np.cumsum(ps[order]) - np.cumsum(qs[order]))[:-1]
    want.append((cdf_gap * np.diff(x)).sum())
  np.testing.assert_allclose(got, want, rtol=1e-2)


def test_wasserstein_is_zero_for_equal_distributions_and_differentiable():
  logp, _ = _probs(21)
  assert np.all(_div("wasserstein", logp, logp, k=9) < 1e-6)
  logq, _ = _probs(22)
  g = jax.grad(lambda lp: dv.wasserstein(jax.nn.log_softmax(lp), jnp.asarray(logq, jnp.float32),
                                         k=5).sum())(jnp.asarray(logp, jnp.float32))
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_divergences_compute_in_float32_from_bf16():
  logp, _ = _probs(23)
  logq, _ = _probs(24)
  out = dv.kl(jnp.asarray(logp, jnp.bfloat16), jnp.asarray(logq, jnp.bfloat16))
  assert out.dtype == jnp.float32


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="valid"):
    dv.divergence("tv", jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(ValueError, match="valid"):
    kr.log_kernel("laplace", jnp.zeros(3), jnp.zeros(3))


# ------------------------------------------------------------------------------------------------
# The loss.
# ------------------------------------------------------------------------------------------------
B, VOCAB = 4, 11


def _outputs(seed):
  rng = np.random.default_rng(seed)
  return {"logps": rng.normal(size=(B, 2)) * 3 - 12, "lengths": np.full((B, 2), 5.0),
          "embeddings": rng.normal(size=(B, 2, D)) * 0.5,
          "prompt_embeddings": np.repeat(rng.normal(size=(B, 1, D)) * 0.5, 2, axis=1),
          "last_logits": rng.normal(size=(B, 2, VOCAB)) * 2}


def _loss(pol, ref, batch=None, **cfg):
  return losses.get("dpo_kernels").fn(pol, ref, batch or {}, ml_collections.ConfigDict(cfg))


def test_dpo_compatible_without_kernel_and_divergence_is_dpo_sigmoid():
  pol, ref = _outputs(30), _outputs(31)
  with jax.enable_x64(True):
    ours, _ = _loss(pol, ref, mode="dpo_compatible", gamma=0.0, divergence_scale=0.0, beta=0.3)
    dpo, _ = losses.dpo_loss(pol, ref, {}, ml_collections.ConfigDict({"beta": 0.3}))
  assert float(ours) == float(dpo)


@pytest.mark.parametrize("kernel", list(kr.KERNELS))
@pytest.mark.parametrize("divergence", ["kl", "renyi", "hellinger"])
def test_modes_match_their_formulas(kernel, divergence):
  pol, ref = _outputs(32), _outputs(33)
  cfg = dict(kernel=kernel, divergence=divergence, beta=0.2, gamma=0.7, kernel_scale=1.3,
             divergence_scale=0.4, renyi_a=0.9)
  with jax.enable_x64(True):
    e_x, e_c, e_r = (jnp.asarray(v) for v in (pol["prompt_embeddings"][:, 0], pol["embeddings"][:, 0],
                                              pol["embeddings"][:, 1]))
    params = {"polynomial": dict(c=1.0, degree=2), "rbf": dict(sigma=1.0),
              "spectral": dict(lambdas=(1.0,), alphas=(1.0,)), "mahalanobis": dict(chol=None, eps=1e-6)}
    kratio = np.asarray(kr.kernel_log_ratio(kernel, e_x, e_c, e_r, **params[kernel]))
    logp = jax.nn.log_softmax(jnp.asarray(pol["last_logits"][:, 0]))
    logq = jax.nn.log_softmax(jnp.asarray(ref["last_logits"][:, 0]))
    d = np.asarray(dv.divergence(divergence, logp, logq, renyi_a=0.9))
    faithful, _ = _loss(pol, ref, mode="faithful", **cfg)
    compatible, _ = _loss(pol, ref, mode="dpo_compatible", **cfg)
  lp, rho = pol["logps"], pol["logps"] - ref["logps"]
  want_f = np.mean(-1.3 * ((lp[:, 0] - lp[:, 1]) + kratio) + 0.4 * d)
  z = 0.2 * ((rho[:, 0] - rho[:, 1]) + 0.7 * kratio)
  want_c = np.mean(np.log1p(np.exp(-z)) + 0.4 * d)
  assert float(faithful) == pytest.approx(want_f, rel=1e-12)
  assert float(compatible) == pytest.approx(want_c, rel=1e-12)


def test_policy_hidden_embeddings_train_the_policy():
  pol, ref = _outputs(34), _outputs(35)
  pol, ref = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), o) for o in (pol, ref))

  def loss_of(emb, prompt, source):
    return _loss({**pol, "embeddings": emb, "prompt_embeddings": prompt},
                 {**ref, "embeddings": emb, "prompt_embeddings": prompt},
                 kernel="rbf", divergence="kl", embedding_source=source)[0]

  g_emb, g_prompt = jax.grad(loss_of, argnums=(0, 1))(pol["embeddings"], pol["prompt_embeddings"],
                                                      "policy_hidden")
  assert float(jnp.abs(g_emb).sum()) > 1e-3
  assert float(jnp.abs(g_prompt[:, 0]).sum()) > 1e-3
  # A frozen source (the reference model's hidden states) gives the policy no kernel gradient.
  g_frozen = jax.grad(loss_of)(pol["embeddings"], pol["prompt_embeddings"], "reference_hidden")
  assert float(jnp.abs(g_frozen).sum()) == 0.0


def test_hmk_params_are_trained_through_the_batch_and_entropy_term():
  pol, ref = _outputs(36), _outputs(37)
  pol, ref = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), o) for o in (pol, ref))
  params = kr.init_hmk_params(D, jax.random.key(0))
  cfg = dict(kernel="hmk", divergence="js")
  loss0, metrics = _loss(pol, ref, {"hmk_params": params}, **cfg)
  assert float(metrics["hmk/w_rbf"]) == 0.5 and float(metrics["hmk/tau_global"]) == 0.5
  grads = jax.grad(lambda p: _loss(pol, ref, {"hmk_params": p}, **cfg)[0])(params)
  for name in ("top_logits", "local_logits", "global_logits", "sigma", "c", "lambdas", "alphas",
               "maha_chol"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name
  reg, _ = _loss(pol, ref, {"hmk_params": params}, hmk_entropy_coef=0.1, **cfg)
  assert float(reg) == pytest.approx(float(loss0) - 0.1 * 3 * math.log(2), rel=1e-6)
  with pytest.raises(ValueError, match="hmk_params"):
    _loss(pol, ref, **cfg)


@pytest.mark.parametrize("divergence", list(dv.DIVERGENCES))
def test_every_divergence_runs_in_the_loss_under_jit(divergence):
  pol, ref = _outputs(38), _outputs(39)
  pol["token_embeddings"] = np.random.default_rng(38).normal(size=(VOCAB, 3))   # Wasserstein's ground cost
  pol, ref = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), o) for o in (pol, ref))
  f = jax.jit(lambda p: _loss(p, ref, kernel="spectral", divergence=divergence, wasserstein_k=6)[0])
  loss = f(pol)
  g = jax.grad(f)(pol)
  assert np.isfinite(float(loss))
  assert float(jnp.abs(g["last_logits"]).sum()) > 0


def test_faithful_mode_is_unbounded_below():
  """The reference formula is linear in log pi(y_r): pushing it down lowers the loss without limit."""
  pol, ref = _outputs(40), _outputs(41)
  lows = []
  for drop in (0.0, 100.0, 1000.0):
    p = {**pol, "logps": pol["logps"] - np.array([0.0, drop])}
    lows.append(float(_loss(p, ref, mode="faithful")[0]))
    assert float(_loss(p, ref, mode="dpo_compatible")[0]) > 0
  assert lows[0] - lows[2] == pytest.approx(1000.0, rel=1e-5)


def test_select_kernel_divergence():
  table_scores = {(k, d): i * 0.01 for i, (k, d) in enumerate(
      (k, d) for k in kr.KERNELS for d in dv.DIVERGENCES)}
  table_scores[("mahalanobis", "js")] = 5.0
  table, best = dk.select_kernel_divergence(lambda k, d: table_scores[(k, d)])
  assert len(table) == 28 and best == ("mahalanobis", "js")
  assert [r[2] for r in table] == sorted((r[2] for r in table), reverse=True)
  _, worst = dk.select_kernel_divergence(lambda k, d: table_scores[(k, d)], higher_is_better=False)
  assert worst == (kr.KERNELS[0], dv.DIVERGENCES[0])
  assert "mahalanobis" in dk.format_selection_table(table).splitlines()[1]
