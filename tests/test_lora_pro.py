"""LoRA-Pro (`peft._lora_pro`): the corrected gradients solve the paper's least-squares problems, then the
optimizer runs on a LoRA tree and inside the trainer.

The optimality checks build the linear maps explicitly and solve them with `np.linalg.lstsq` (float64), so
they check the closed form against the problem statement, not against a transcription of it:
- over all (g_a', g_b'): the equivalent gradient s (g_a' b + a g_b') is as close to the full gradient g as
  any (for both choices of X), and strictly closer than plain LoRA's;
- over the free r x r matrix: the Sylvester choice keeps (g_a', g_b') closest to the plain LoRA gradients.
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

import peft
from optim._lora_pro import corrected_lora_grads, lora_pro, scale_by_lora_pro

IN, OUT, R, S = 7, 5, 3, 1.7


def _problem(seed=0, lead=()):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(lead + (IN, R))
  b = rng.standard_normal(lead + (R, OUT))
  g = rng.standard_normal(lead + (IN, OUT))                # full gradient of the [in, out] kernel
  # Chain rule through W = W0 + s a b.
  ga = S * g @ np.swapaxes(b, -1, -2)
  gb = S * np.swapaxes(a, -1, -2) @ g
  return a, b, g, ga, gb


def _ours(a, b, ga, gb, x_mode, **kw):
  with jax.enable_x64(True):
    out = corrected_lora_grads(*(jnp.asarray(x, jnp.float64) for x in (a, b, ga, gb)), S, x_mode=x_mode, **kw)
    return tuple(np.asarray(x, np.float64) for x in out)


def _matrix(fn, n_in):
  """The matrix of a linear map R^n_in -> R^m, column by column."""
  return np.stack([fn(e) for e in np.eye(n_in)], axis=1)


def _equivalent(a, b, ga2, gb2):
  return S * (ga2 @ b + a @ gb2)


@pytest.mark.parametrize("x_mode", ["zero", "sylvester"])
def test_equivalent_gradient_is_least_squares_optimal(x_mode):
  a, b, g, ga, gb = _problem()
  split = IN * R
  lin = _matrix(lambda v: _equivalent(a, b, v[:split].reshape(IN, R), v[split:].reshape(R, OUT)).ravel(),
                split + R * OUT)
  sol = np.linalg.lstsq(lin, g.ravel(), rcond=None)[0]
  best = np.linalg.norm(lin @ sol - g.ravel())
  ga2, gb2 = _ours(a, b, ga, gb, x_mode)
  dist = np.linalg.norm(_equivalent(a, b, ga2, gb2) - g)
  assert abs(dist - best) <= 1e-6 * best
  # Plain LoRA's equivalent gradient is far from optimal (so the check above can fail), and the optimum is
  # the projection of g onto {U b + a V}: P_a g + g P_b - P_a g P_b in our [in, out] layout.
  assert np.linalg.norm(_equivalent(a, b, ga, gb) - g) > 1.05 * best
  pa = a @ np.linalg.pinv(a)
  pb = np.linalg.pinv(b) @ b
  np.testing.assert_allclose(_equivalent(a, b, ga2, gb2), pa @ g + g @ pb - pa @ g @ pb, rtol=0, atol=1e-6)


def test_zero_x_matches_closed_form():
  a, b, _, ga, gb = _problem(1)
  ga2, gb2 = _ours(a, b, ga, gb, "zero")
  inv_mb = np.linalg.inv(b @ b.T)
  inv_ma = np.linalg.inv(a.T @ a)
  # Paper (W = W0 + s B A, B = bᵀ, A = aᵀ): g_A' = (BᵀB)⁻¹ g_A / s², g_B' = (I - B(BᵀB)⁻¹Bᵀ) g_B (AAᵀ)⁻¹ / s².
  want_a = (inv_mb @ ga.T).T / S**2
  want_b = ((np.eye(OUT) - b.T @ inv_mb @ b) @ gb.T @ inv_ma).T / S**2
  np.testing.assert_allclose(ga2, want_a, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(gb2, want_b, rtol=1e-6, atol=1e-9)


def test_sylvester_x_is_closest_to_lora_gradients():
  a, b, _, ga, gb = _problem(2)
  za, zb = _ours(a, b, ga, gb, "zero")
  # Every minimiser is (za + a Y, zb - Y b); pick Y minimising the distance to the plain LoRA gradients.
  lin = _matrix(lambda y: np.concatenate([(a @ y.reshape(R, R)).ravel(), (-y.reshape(R, R) @ b).ravel()]),
                R * R)
  target = np.concatenate([(ga - za).ravel(), (gb - zb).ravel()])
  y = np.linalg.lstsq(lin, target, rcond=None)[0]
  best = np.linalg.norm(lin @ y - target)
  sa, sb = _ours(a, b, ga, gb, "sylvester")
  dist = np.sqrt(np.sum((sa - ga) ** 2) + np.sum((sb - gb) ** 2))
  assert abs(dist - best) <= 1e-6 * best
  # X = 0 is measurably worse (the gap is small: Y has only r² degrees of freedom), so X really moved.
  assert np.sqrt(np.sum((za - ga) ** 2) + np.sum((zb - gb) ** 2)) - best > 1e-4 * best
  assert np.linalg.norm(sa - za) > 1e-2 * np.linalg.norm(za)


def test_stacked_layers_and_zero_b():
  a, b, _, ga, gb = _problem(3, lead=(2,))
  b[1] = 0.0                                                # LoRA's default init: b = 0, so g_a = 0
  ga[1] = 0.0
  ga2, gb2 = _ours(a, b, ga, gb, "sylvester")
  for l in range(2):
    la, lb = _ours(a[l], b[l], ga[l], gb[l], "sylvester")
    np.testing.assert_allclose(ga2[l], la, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb2[l], lb, rtol=1e-12, atol=1e-12)
  assert np.all(np.isfinite(ga2)) and np.all(ga2[1] == 0.0)
  np.testing.assert_allclose(gb2[1], np.linalg.inv(a[1].T @ a[1]) @ gb[1] / S**2, rtol=1e-6)
  # float32 / bfloat16 in, same dtype out, close to the float64 result.
  f32 = corrected_lora_grads(*(jnp.asarray(x[0], jnp.float32) for x in (a, b, ga, gb)), S)
  assert f32[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(f32[0]), ga2[0], rtol=1e-3, atol=1e-4)


def _tree(seed=4):
  a, b, g, ga, gb = _problem(seed)
  rng = np.random.default_rng(seed + 1)
  node = peft.LoRA(jnp.asarray(rng.standard_normal((IN, OUT)), jnp.float32), jnp.asarray(a, jnp.float32),
                   jnp.asarray(b, jnp.float32), scale=S)
  trainable, _ = peft.split({"w": node, "bias": jnp.ones((OUT,))}, train_base=False)
  trainable["bias"] = jnp.ones((OUT,))
  grads = {"w": trainable["w"].replace(a=jnp.asarray(ga, jnp.float32), b=jnp.asarray(gb, jnp.float32)),
           "bias": jnp.asarray(rng.standard_normal(OUT), jnp.float32)}
  return trainable, grads


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_optimizer_applies_inner_rule_to_corrected_gradients(inner):
  params, grads = _tree()
  want_a, want_b = corrected_lora_grads(params["w"].a, params["w"].b, grads["w"].a, grads["w"].b, S)
  lr = 0.1
  tx = lora_pro(lr, optimizer=inner)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  ref = optax.sgd(lr) if inner == "sgd" else optax.adam(lr)
  fixed = {"w": grads["w"].replace(a=want_a, b=want_b), "bias": grads["bias"]}
  want, _ = ref.update(fixed, ref.init(params), params)
  for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(want_a), np.asarray(grads["w"].a), rtol=0.1)   # the correction acted


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="x_mode"):
    scale_by_lora_pro(x_mode="symmetry")
  with pytest.raises(ValueError, match="optimizer"):
    scale_by_lora_pro(optimizer="lion")
  params, grads = _tree()
  tx = scale_by_lora_pro()
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))


@pytest.mark.slow
def test_trains_inside_trainer(tmp_path):
  import train_lib
  from configs import lora
  c = lora.get_config("model=tiny,smoke")
  with c.unlocked():
    c.optim.name = "lora_pro"
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(summary["after"]["loss"])
  assert summary["after"]["loss"] < summary["before"]["loss"]
  b = [v for p, v in peft.flatten(jax.device_get(summary["state"].params)).items() if p.endswith("/b")]
  assert b and any(np.abs(v).max() > 0 for v in b)
