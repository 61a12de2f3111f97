"""LIFT (`peft/_lift.py`) against a numpy re-derivation of its rules: the principal entries (top-k of the
rank-r approximation's magnitudes, float64 SVD), the sparse legacy-AdamW step on them, the state size, and the
mask refresh (when it happens, and which moments it keeps)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim import _lift

L, M, N = 2, 12, 20          # a stacked [L, in, out] kernel
RANK, FILTER = 1, 3          # k = (12 + 20) * 1 = 32 of 240 entries
B1, B2, EPS, LR, WD = 0.9, 0.95, 1e-6, 0.01, 0.1


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"layers": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(L, M, N)), jnp.float32)}}},
          "bias": jnp.asarray(rng.normal(size=(N,)), jnp.float32)}


def _grads(seed):
  rng = np.random.default_rng(100 + seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), _params())


def _np_principal(w, r, k):
  """[L, k] sorted flat indices of the k largest |W_r| entries, per layer, in float64."""
  out = []
  for wl in np.asarray(w, np.float64):
    u, s, vt = np.linalg.svd(wl, full_matrices=False)
    wr = (u[:, :r] * s[:r]) @ vt[:r]
    out.append(np.sort(np.argsort(-np.abs(wr).ravel(), kind="stable")[:k]))
  return np.stack(out)


def _kernel(tree):
  return np.asarray(tree["layers"]["attn"]["q_proj"]["kernel"])


def test_principal_entries_are_the_top_k_of_the_low_rank_approximation():
  w = _kernel(_params())
  k = _lift.num_principal(w.shape, RANK)
  assert k == (M + N) * RANK
  np.testing.assert_array_equal(_lift.principal_indices(jnp.asarray(w), FILTER, k), _np_principal(w, FILTER, k))
  # Not simply the largest |W|: the rank reduction changes the choice.
  assert not np.array_equal(_np_principal(w, FILTER, k), _np_principal(w, min(M, N), k))
  assert _lift.num_principal((4096, 11008), 128) == (4096 + 11008) * 128
  assert _lift.num_principal((8, 8), 128) == 64                      # capped at every entry


def test_sparse_adamw_steps_only_the_principal_entries():
  params = _params()
  tx = _lift.lift(LR, rank=RANK, filter_rank=FILTER, update_interval=100, b1=B1, b2=B2, eps=EPS,
                  weight_decay=WD)
  state = tx.init(params)
  idx = _np_principal(_kernel(params), FILTER, (M + N) * RANK)
  w = _kernel(params).reshape(L, -1).astype(np.float64)
  b = np.asarray(params["bias"], np.float64)
  m, v = np.zeros(idx.shape), np.zeros(idx.shape)
  mb, vb = np.zeros(N), np.zeros(N)
  update = jax.jit(tx.update)
  for t in range(1, 4):
    g = _grads(t)
    updates, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    gk = np.take_along_axis(_kernel(g).reshape(L, -1), idx, -1)
    m, v = B1 * m + (1 - B1) * gk, B2 * v + (1 - B2) * gk ** 2
    factor = np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
    ws = np.take_along_axis(w, idx, -1)
    np.put_along_axis(w, idx, ws - LR * (factor * m / (np.sqrt(v) + EPS) + WD * ws), -1)
    gb = np.asarray(g["bias"])
    mb, vb = B1 * mb + (1 - B1) * gb, B2 * vb + (1 - B2) * gb ** 2
    b = b - LR * (factor * mb / (np.sqrt(vb) + EPS) + WD * b)
  np.testing.assert_allclose(_kernel(params).reshape(L, -1), w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["bias"], b, rtol=1e-5, atol=1e-6)
  untouched = np.ones((L, M * N), bool)
  np.put_along_axis(untouched, idx, False, -1)
  np.testing.assert_array_equal(_kernel(params).reshape(L, -1)[untouched],
                                _kernel(_params()).reshape(L, -1)[untouched])


def test_state_holds_three_numbers_per_principal_entry():
  params = _params()
  state = _lift.scale_by_lift(rank=RANK, filter_rank=FILTER).init(params)
  k = (M + N) * RANK
  assert state.idx["layers"]["attn"]["q_proj"]["kernel"].shape == (L, k)
  assert state.idx["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.int32
  assert state.mu["layers"]["attn"]["q_proj"]["kernel"].shape == (L, k)
  assert state.nu["layers"]["attn"]["q_proj"]["kernel"].shape == (L, k)
  assert state.mu["bias"].shape == (N,)                              # outside the mask: dense Adam


def test_refresh_timing_and_moments_of_kept_and_entering_entries():
  """update_interval=2: the set is re-picked before the step with 1 step done ((1 + 1) % 2 == 0), from the
  weights passed then; entries kept carry their moments, entering ones start at zero."""
  tx = _lift.scale_by_lift(rank=RANK, filter_rank=FILTER, update_interval=2, b1=B1, b2=B2, eps=EPS)
  p0, p1 = _params(0), _params(1)                # p1: other weights, so another principal set
  state = tx.init(p0)
  idx0 = _np_principal(_kernel(p0), FILTER, (M + N) * RANK)
  _, state = tx.update(_grads(0), state, p1)     # 0 steps done: no refresh, even with other weights
  np.testing.assert_array_equal(state.idx["layers"]["attn"]["q_proj"]["kernel"], idx0)
  mu0 = np.asarray(state.mu["layers"]["attn"]["q_proj"]["kernel"])
  nu0 = np.asarray(state.nu["layers"]["attn"]["q_proj"]["kernel"])
  g1 = _grads(1)
  _, state = tx.update(g1, state, p1)            # 1 step done: refresh from p1
  idx1 = _np_principal(_kernel(p1), FILTER, (M + N) * RANK)
  np.testing.assert_array_equal(state.idx["layers"]["attn"]["q_proj"]["kernel"], idx1)
  gk = np.take_along_axis(_kernel(g1).reshape(L, -1), idx1, -1)
  want_mu, want_nu = (1 - B1) * gk, (1 - B2) * gk ** 2
  n_kept = 0
  for l in range(L):
    for j, e in enumerate(idx1[l]):
      hit = np.flatnonzero(idx0[l] == e)
      if hit.size:
        want_mu[l, j] += B1 * mu0[l, hit[0]]
        want_nu[l, j] += B2 * nu0[l, hit[0]]
        n_kept += 1
  assert 0 < n_kept < idx1.size                  # some entries stay, some enter
  np.testing.assert_allclose(state.mu["layers"]["attn"]["q_proj"]["kernel"], want_mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.nu["layers"]["attn"]["q_proj"]["kernel"], want_nu, rtol=1e-5, atol=1e-8)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="rank must be a positive int"):
    _lift.scale_by_lift(rank=0)
  with pytest.raises(ValueError, match="needs params"):
    tx = _lift.scale_by_lift(rank=1, filter_rank=1)
    tx.update(_grads(0), tx.init(_params()))
