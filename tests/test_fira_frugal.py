"""Fira and FRUGAL (`peft._fira`, `peft._frugal`): steps against a float64 NumPy evaluation of the update
rules written out here, then behaviour (shapes, cadence, errors, inject_hyperparams, convergence).

The NumPy side recomputes everything it can on its own (SVD projectors, with the sign rule of
`peft._projector.canonical_signs`: the largest-|.| entry of each output-side singular vector is positive).
Random subspaces (random projectors, coordinates, blocks) cannot be redrawn with NumPy, so it reads them
from our state after each step and checks their properties and cadence instead.
"""
import math

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from optim._fira import fira, scale_by_fira
from optim._frugal import frugal, scale_by_frugal
from optim._galore import galore

B1, B2 = 0.9, 0.999
# A stack of 2 kernels [in=6, out=10] (torch [10, 6]) and a head [10, 6] (torch [6, 10]): both orientations.
PARAMS = {"layers": {"kernel": jnp.zeros((2, 6, 10))}, "head": {"kernel": jnp.zeros((10, 6))},
          "bias": jnp.zeros(6)}
MATRICES = (("layers", "kernel"), ("head", "kernel"))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _grads(n, growth=None, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(n):
    f = 1.0 if growth is None else growth[t]
    out.append(jax.tree.map(lambda x: jnp.asarray(f * rng.standard_normal(x.shape), jnp.float32), PARAMS))
  return out


def _side(proj_type, shape):
  """'in' when the torch [out, in] matrix is reduced on its columns (inputs), 'out' on its rows."""
  m, n = shape[1], shape[0]
  return {"std": "in" if m >= n else "out", "reverse_std": "out" if m >= n else "in",
          "right": "in", "left": "out"}[proj_type]


def _svd_projector(g, r, side):
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  u, v = u[:, :r], vh[:r].T
  sign = np.sign(v[np.abs(v).argmax(axis=0), np.arange(r)])
  return (u if side == "in" else v) * sign


def _down(g, p, side):
  return p.T @ g if side == "in" else g @ p


def _back(x, p, side):
  return p @ x if side == "in" else x @ p.T


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------------
# Fira.
# ------------------------------------------------------------------------------------------------------
def _fira_reference(grads, rank, gap, scale, proj_type, gamma, eps):
  """Fira's AdamW rule per matrix (each slice of a stack): per-step updates and the limiter's hits."""
  slices = [(path, j) for path in MATRICES for j in range(2 if path[0] == "layers" else 1)]
  st = {s: {} for s in slices}
  bias_m = bias_v = 0.0
  steps, hits = [], []
  for t, g_tree in enumerate(grads):
    out = {}
    for path, j in slices:
      g = np.asarray(_get(g_tree, path), np.float64)
      g = g[j] if path[0] == "layers" else g
      s, side, r = st[(path, j)], _side(proj_type, g.shape), min(rank, *g.shape)
      if t % gap == 0:
        s["p"] = _svd_projector(g, r, side)
      R = _down(g, s["p"], side)
      s["m"] = B1 * s.get("m", 0.0) + (1 - B1) * R
      s["v"] = B2 * s.get("v", 0.0) + (1 - B2) * R ** 2
      N = s["m"] / (np.sqrt(s["v"]) + eps)
      axis = 0 if side == "in" else 1  # the r axis of R
      phi = np.linalg.norm(N, axis=axis, keepdims=True) / (np.linalg.norm(R, axis=axis, keepdims=True) + 1e-8)
      S = (g - scale * _back(R, s["p"], side)) * phi
      norm = np.linalg.norm(S)
      if t == 0:
        s["prev"] = norm
      else:
        lim = max(norm / (s["prev"] + 1e-8), gamma) / gamma
        hits.append(lim > 1)
        S, s["prev"] = S / lim, norm / lim
      c = math.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
      out[(path, j)] = c * (scale * _back(N, s["p"], side) + S)
    gb = np.asarray(g_tree["bias"], np.float64)
    bias_m, bias_v = B1 * bias_m + (1 - B1) * gb, B2 * bias_v + (1 - B2) * gb ** 2
    c = math.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
    out["bias"] = c * bias_m / (np.sqrt(bias_v) + eps)
    steps.append(out)
  return steps, hits


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fira_matches_its_update_rule(proj_type):
  rank, gap, scale, gamma, eps = 2, 3, 0.5, 1.01, 1e-6
  # Norms that grow, shrink and grow again: the limiter clips some steps and leaves others alone.
  grads = _grads(6, growth=[1.0, 1.6, 0.6, 2.0, 2.6, 1.0], seed=1)
  ref, hits = _fira_reference(grads, rank, gap, scale, proj_type, gamma, eps)
  assert any(hits) and not all(hits)
  tx = scale_by_fira(rank=rank, update_proj_gap=gap, scale=scale, proj_type=proj_type, gamma=gamma, eps=eps)
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  for t, g in enumerate(grads):
    u, state = update(g, state)
    for (path, j), expected in ((k, v) for k, v in ref[t].items() if k != "bias"):
      got = _get(u, path)
      got = got[j] if path[0] == "layers" else got
      assert _rel(got, expected) < 2e-5, (t, path, j)
    assert _rel(u["bias"], ref[t]["bias"]) < 1e-6
  assert state.residual_norm["layers"]["kernel"].shape == (2,)  # one limiter memory per layer


def test_fira_rejects_full_projection_and_1d_masks():
  with pytest.raises(ValueError, match="proj_type"):
    scale_by_fira(proj_type="full")
  with pytest.raises(ValueError, match="'bias' has shape"):
    mask = {"layers": {"kernel": True}, "head": {"kernel": True}, "bias": True}
    scale_by_fira(rank=2, mask=mask).init(PARAMS)


# ------------------------------------------------------------------------------------------------------
# FRUGAL.
# ------------------------------------------------------------------------------------------------------
def _rule(x, rule):
  return {"sign_sgd": np.sign(x), "sgd": x, "no": np.zeros_like(x)}[rule]


def _adam(m, v, t, eps):
  return (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + eps)


def _check_cadence(history, gap):
  """A random subspace changes exactly at refresh steps."""
  for t in range(1, len(history)):
    same = all(np.array_equal(a, b) for a, b in zip(history[t], history[t - 1]))
    assert same == (t % gap != 0), t


FRUGAL_CASES = [
    # subspace, proj_type, inactive rule, reset_statistics
    ("svd", "std", "sign_sgd", True),
    ("svd", "reverse_std", "sgd", False),
    ("svd", "left", "no", True),
    ("random", "std", "sign_sgd", True),
    ("columns", "std", "sign_sgd", False),
    ("rows", "std", "sgd", True),
    ("randk", "std", "sign_sgd", True),
    ("block", "std", "sign_sgd", True),
]


@pytest.mark.parametrize("subspace,proj_type,rule,reset", FRUGAL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'reset' if c[3] else 'keep'}" for c in FRUGAL_CASES])
def test_frugal_matches_its_update_rule(subspace, proj_type, rule, reset):
  density, gap, kappa, eps, T = 0.34, 2, 0.3, 1e-8, 5
  grads = _grads(T, seed=2)
  tx = scale_by_frugal(density=density, update_gap=gap, subspace=subspace, proj_type=proj_type,
                       inactive_update_rule=rule, inactive_lr_scale=kappa, reset_statistics=reset, eps=eps,
                       block_order="ascending" if subspace == "block" else "random")
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  ref_state, history = {}, []
  for t, g_tree in enumerate(grads):
    u, state = update(g_tree, state)
    refresh = t % gap == 0
    t_eff = t % gap + 1 if (reset or subspace == "block") else t + 1
    history.append([np.asarray(_get(state.projector, p)) for p in MATRICES])
    for path in MATRICES:
      g_all = np.asarray(_get(g_tree, path), np.float64)
      proj_all = np.asarray(_get(state.projector, path))
      for j in range(2 if path[0] == "layers" else 1):
        g = g_all[j] if path[0] == "layers" else g_all
        proj = proj_all[j] if path[0] == "layers" else proj_all
        s = ref_state.setdefault((path, j), {"m": 0.0, "v": 0.0})
        if refresh and (reset or subspace == "block"):
          s["m"], s["v"] = 0.0, 0.0
        if subspace == "block":
          if proj:
            s["m"], s["v"] = B1 * s["m"] + (1 - B1) * g, B2 * s["v"] + (1 - B2) * g ** 2
            expected = _adam(s["m"], s["v"], t_eff, eps)
          else:
            s["m"], s["v"] = 0.0, 0.0
            expected = kappa * _rule(g, rule)
        else:
          if subspace in ("svd", "random"):
            side = _side(proj_type, g.shape)
            r = round(g.shape[0 if side == "in" else 1] * density)
            if subspace == "svd":
              if refresh:
                s["p"] = _svd_projector(g, r, side)
            else:
              s["p"] = proj.astype(np.float64)
              np.testing.assert_allclose(s["p"].T @ s["p"], np.eye(r), atol=1e-5)
            down = lambda x: _down(x, s["p"], side)
            up = lambda x: _back(x, s["p"], side)
          else:
            n = {"columns": g.shape[0], "rows": g.shape[1], "randk": g.size}[subspace]
            assert len(proj) == int(n * density) and len(set(proj.tolist())) == len(proj)
            assert proj.min() >= 0 and proj.max() < n
            # Moments are positional (slot k follows the k-th drawn index), as in the reference.
            def down(x, idx=proj):
              return {"columns": lambda: x[idx, :], "rows": lambda: x[:, idx],
                      "randk": lambda: x.reshape(-1)[idx]}[subspace]()

            def up(x, idx=proj, shape=g.shape):
              z = np.zeros(shape)
              if subspace == "columns":
                z[idx, :] = x
              elif subspace == "rows":
                z[:, idx] = x
              else:
                z.reshape(-1)[idx] = x
              return z
          low = down(g)
          s["m"], s["v"] = B1 * s["m"] + (1 - B1) * low, B2 * s["v"] + (1 - B2) * low ** 2
          expected = up(_adam(s["m"], s["v"], t_eff, eps)) + kappa * _rule(g - up(low), rule)
        got = np.asarray(_get(u, path))
        got = got[j] if path[0] == "layers" else got
        assert _rel(got, expected) < 2e-5, (t, path, j)
    gb = np.asarray(g_tree["bias"], np.float64)  # unprojected: plain Adam
    s = ref_state.setdefault("bias", {"m": 0.0, "v": 0.0})
    s["m"], s["v"] = B1 * s["m"] + (1 - B1) * gb, B2 * s["v"] + (1 - B2) * gb ** 2
    assert _rel(u["bias"], _adam(s["m"], s["v"], t + 1, eps)) < 1e-6
  if subspace != "svd":
    _check_cadence(history, gap)


def _reference_block_walk(n, n_active, order, periods):
  """The reference BlockOptimizer's `next_block_start` loop, step by step."""
  start, out = None, []
  for _ in range(periods):
    if order == "ascending":
      start = 0 if start is None else start
      ids = [i % n for i in range(start, start + n_active)]
      start += n_active
      start -= n if start >= n else 0
    elif order == "descending":
      start = n - 1 if start is None else start
      ids = [i % n for i in range(start, start - n_active, -1)]
      start -= n_active
      start += n if start < 0 else 0
    else:  # mirror
      start = 0 if start is None else start
      ids = []
      for i in range(start, start + n_active // 2):
        ids += [i % (n // 2), n - 1 - i % (n // 2)]
      start += n_active // 2
      start -= n // 2 if start >= n // 2 else 0
    out.append(sorted(ids))
  return out


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror", "random"])
def test_frugal_block_orders(order):
  # Blocks in tree order: head/kernel (block 0), then the 5 layers of layers/kernel (blocks 1..5).
  params = {"head": {"kernel": jnp.zeros((4, 3))}, "layers": {"kernel": jnp.zeros((5, 4, 3))}}
  n, density, gap, periods = 6, 0.34, 2, 5
  n_active = round(n * density)
  tx = scale_by_frugal(density=density, update_gap=gap, subspace="block", block_order=order, seed=3)
  state, update = tx.init(params), jax.jit(tx.update)
  seen = []
  for t in range(gap * periods):
    g = jax.tree.map(lambda x: jnp.ones_like(x), params)
    _, state = update(g, state)
    active = np.concatenate([np.asarray(state.projector["head"]["kernel"]).reshape(-1),
                             np.asarray(state.projector["layers"]["kernel"])])
    if t % gap:
      assert np.array_equal(active, seen[-1]), t  # no change inside a period
    else:
      seen.append(active)
  ids = [sorted(np.flatnonzero(a).tolist()) for a in seen]
  assert all(len(i) == n_active for i in ids)
  if order == "random":
    assert len({tuple(i) for i in ids}) > 1
  else:
    assert ids == _reference_block_walk(n, n_active, order, periods)


def test_frugal_shapes_and_errors():
  shapes = lambda **kw: jax.tree.map(jnp.shape, scale_by_frugal(density=0.34, **kw).init(PARAMS).mu)
  # layers [2, in=6, out=10] is torch [10, 6]: std reduces the 6 inputs to round(6 * 0.34) = 2.
  assert shapes(subspace="svd")["layers"]["kernel"] == (2, 2, 10)
  assert shapes(subspace="svd", proj_type="reverse_std")["layers"]["kernel"] == (2, 6, 3)
  assert shapes(subspace="columns")["head"]["kernel"] == (3, 6)   # int(10 * 0.34) inputs
  assert shapes(subspace="rows")["head"]["kernel"] == (10, 2)     # int(6 * 0.34) outputs
  assert shapes(subspace="randk")["layers"]["kernel"] == (2, 20)  # int(60 * 0.34) entries
  assert shapes(subspace="block")["layers"]["kernel"] == (2, 6, 10)
  assert shapes(subspace="svd")["bias"] == (6,)
  with pytest.raises(ValueError, match="mirror"):
    scale_by_frugal(density=0.34, subspace="block", block_order="mirror").init(PARAMS)  # 3 blocks -> 1 active
  for kwargs in ({"subspace": "lowrank"}, {"inactive_update_rule": "adam"}, {"density": 0.0},
                 {"proj_type": "full"}, {"block_order": "zigzag"}, {"update_gap": 0}):
    with pytest.raises(ValueError):
      scale_by_frugal(**kwargs)


# ------------------------------------------------------------------------------------------------------
# Contract: inject_hyperparams, convergence.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fira", "frugal"])
def test_inject_hyperparams_gives_the_same_steps(name):
  schedule = optax.linear_schedule(0.05, 0.01, 4)
  if name == "fira":
    factory, static = fira, ("rank", "update_proj_gap")
    kwargs = dict(rank=2, update_proj_gap=2, scale=0.5, gamma=1.01, weight_decay=0.1)
  else:
    factory, static = frugal, ("density", "update_gap", "subspace", "seed")
    kwargs = dict(density=0.34, update_gap=2, subspace="random", inactive_lr_scale=0.3, weight_decay=0.1)
  plain = factory(schedule, **kwargs)
  injected = optax.inject_hyperparams(factory, static_args=static)(learning_rate=schedule, **kwargs)
  p1 = p2 = jax.tree.map(jnp.ones_like, PARAMS)
  s1, s2 = plain.init(p1), injected.init(p2)
  for g in _grads(4, seed=4):
    u1, s1 = jax.jit(plain.update)(g, s1, p1)
    u2, s2 = jax.jit(injected.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,kwargs,ratio", [
    ("fira", dict(rank=4, update_proj_gap=20), 1e-3),
    ("frugal", dict(density=0.25, update_gap=20, subspace="svd", inactive_lr_scale=0.1), 1e-3),
    # 4 of 16 input rows hold Adam state per period; the rest moves by 0.1 lr sign steps only.
    ("frugal", dict(density=0.25, update_gap=20, subspace="columns", inactive_lr_scale=0.1), 1e-2),
])
def test_least_squares_converges(name, kwargs, ratio):
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (64, 16))
  y = x @ jax.random.normal(kw, (16, 12))
  loss = lambda p: jnp.mean(jnp.square(x @ p["kernel"] - y))
  lr = optax.cosine_decay_schedule(0.05, 400)  # sign-SGD on the remainder needs a decaying step
  tx = {"fira": fira, "frugal": frugal}[name](lr, **kwargs)
  params = {"kernel": jnp.zeros((16, 12))}

  def step(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=400)
  assert float(loss(params)) < ratio * float(loss({"kernel": jnp.zeros((16, 12))}))


@pytest.mark.parametrize("name", ["galore", "fira", "frugal-svd", "frugal-randk", "frugal-block"])
def test_composes_with_partition_and_keeps_state_types(name):
  """Inside optax.partition (the trainer's multi_transform) with bf16 params: the other label's leaves are
  untouched by the projection, and the state keeps its shapes and dtypes step after step (no retrace)."""
  factory = {"galore": lambda: galore(1e-2, rank=2, update_proj_gap=2),
             "fira": lambda: fira(1e-2, rank=2, update_proj_gap=2),
             "frugal-svd": lambda: frugal(1e-2, update_gap=2, subspace="svd", density=0.5),
             "frugal-randk": lambda: frugal(1e-2, update_gap=2, subspace="randk", density=0.5),
             "frugal-block": lambda: frugal(1e-2, update_gap=2, subspace="block", density=0.67)}[name]
  params = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.bfloat16), PARAMS)
  labels = {"layers": {"kernel": "proj"}, "head": {"kernel": "proj"}, "bias": "adam"}
  tx = optax.partition({"proj": factory(), "adam": optax.adam(1e-2)}, labels)
  state, update = tx.init(params), jax.jit(tx.update)
  types = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  before = types(state)
  for g in _grads(3, seed=6):
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
    u, state = update(g, state, params)
    assert types(state) == before
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
  adam_alone = optax.adam(1e-2)
  s = adam_alone.init(params["bias"])
  for g in _grads(3, seed=6):
    ub, s = adam_alone.update(g["bias"].astype(jnp.bfloat16), s)
  np.testing.assert_array_equal(np.asarray(u["bias"], np.float32), np.asarray(ub, np.float32))
