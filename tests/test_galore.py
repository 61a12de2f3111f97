"""GaLore (`peft._galore`, `peft._projector`): parity with galore-torch, then behaviour.

Parity: the same initial weights and 6 fixed gradients (update_proj_gap=3, so the projector is refreshed
at steps 0 and 3 and the moments cross a refresh) through galore-torch's AdamW and through
`galore(..., decay_updated_weights=True)`, for every galore-torch projection type on a non-square kernel in
both orientations, with weight decay and scale != 1. A plain-AdamW bias rides along in each case.

Singular vectors are defined up to sign, and after a refresh the carried moments mix old and new bases, so
the trajectory is not sign-invariant (within one period it is: sign flips of P cancel in P·N). Both sides
therefore fix signs with the same rule (ours in `canonical_signs`; the reference script wraps
`torch.linalg.svd`), which keeps the comparison tight instead of loosening it.

`full` (R = Uᵣᵀ G Vᵣ) is diagonal at a refresh step: its off-diagonal entries are float32 rounding noise
that Adam normalises to ±O(1) when eps is small, in galore-torch as much as here. Those cases use
eps=1e-3, which damps the noise below the tolerance.
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from optim import _projector as pj
from optim._galore import galore, scale_by_galore
from tests import refenv

T, GAP, RANK, SCALE, LR, WD = 6, 3, 3, 0.5, 0.1, 0.1
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SHAPES = ((8, 12), (12, 8))  # ours [in, out]: torch [12, 8] (m > n) and [8, 12] (m < n)
CASES = [(pt, shape) for pt in PROJ_TYPES for shape in SHAPES]


def _eps(proj_type):
  return 1e-3 if proj_type == "full" else 1e-6


def _case_arrays():
  rng = np.random.default_rng(0)
  arrays = {}
  for i, (_, shape) in enumerate(CASES):
    arrays[f"w{i}"] = rng.standard_normal(shape).astype(np.float32)
    arrays[f"g{i}"] = rng.standard_normal((T,) + shape).astype(np.float32)
    arrays[f"b{i}"] = rng.standard_normal(shape[1]).astype(np.float32)
    arrays[f"gb{i}"] = rng.standard_normal((T, shape[1])).astype(np.float32)
  return arrays


@pytest.fixture(scope="module")
def galore_torch():
  refenv.require()
  arrays = _case_arrays()
  rows = ";".join(f"{pt},{RANK},{GAP},{SCALE},{LR},{WD},{_eps(pt)}" for pt, _ in CASES)
  return arrays, refenv.run("galore_steps", arrays, cases=rows)


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{pt}-{s[0]}x{s[1]}" for pt, s in CASES])
def test_matches_galore_torch(galore_torch, i):
  arrays, ref = galore_torch
  proj_type, _ = CASES[i]
  params = {"kernel": jnp.asarray(arrays[f"w{i}"]), "bias": jnp.asarray(arrays[f"b{i}"])}
  tx = galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type, eps=_eps(proj_type),
              weight_decay=WD, decay_updated_weights=True)
  state, update = tx.init(params), jax.jit(tx.update)
  for t in range(T):
    grads = {"kernel": jnp.asarray(arrays[f"g{i}"][t]), "bias": jnp.asarray(arrays[f"gb{i}"][t])}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name, key in (("kernel", "w"), ("bias", "b")):
    ours, theirs, start = np.asarray(params[name]), ref[f"{key}{i}"], arrays[f"{key}{i}"]
    assert _rel(ours, theirs) <= 1e-5, name
    assert _rel(ours - start, theirs - start) <= 1e-5, name  # the part that moved, not only the weights


# ------------------------------------------------------------------------------------------------------
# Behaviour.
# ------------------------------------------------------------------------------------------------------
def _grads(key, params, n):
  return [jax.tree.map(lambda x, k=jax.random.fold_in(key, t): jax.random.normal(k, x.shape, x.dtype), params)
          for t in range(n)]


PARAMS = {"layers": {"attn": {"kernel": jnp.zeros((2, 8, 12))}, "norm": {"scale": jnp.zeros((2, 12))}},
          "head": {"kernel": jnp.zeros((12, 6))}, "bias": jnp.zeros(6)}


@pytest.mark.parametrize("proj_type,stack_mu,head_mu", [
    # stack [2, in=8, out=12]: torch G is [12, 8]; head [12, 6]: torch G is [6, 12].
    ("std", (2, 3, 12), (12, 3)),          # reduce the smaller side: moments r x max(m, n)
    ("reverse_std", (2, 8, 3), (3, 6)),    # reduce the larger side: r x min(m, n)
    ("left", (2, 8, 3), (12, 3)),          # torch left = the outputs
    ("right", (2, 3, 12), (3, 6)),         # torch right = the inputs
    ("full", (2, 3, 3), (3, 3)),
])
def test_state_shapes(proj_type, stack_mu, head_mu):
  state = scale_by_galore(rank=3, proj_type=proj_type).init(PARAMS)
  assert state.mu["layers"]["attn"]["kernel"].shape == stack_mu
  assert state.nu["head"]["kernel"].shape == head_mu
  # Stacked norm scales are 2-D but are not kernels: plain full-size moments, no projector.
  assert state.mu["layers"]["norm"]["scale"].shape == (2, 12)
  assert state.mu["bias"].shape == (6,)
  assert isinstance(state.projector["bias"], optax.MaskedNode)
  assert isinstance(state.projector["layers"]["norm"]["scale"], optax.MaskedNode)


def test_explicit_mask_and_bad_arguments():
  mask = jax.tree.map(lambda _: False, PARAMS)
  mask["bias"] = True
  with pytest.raises(ValueError, match="'bias' has shape"):
    scale_by_galore(rank=2, mask=mask).init(PARAMS)
  state = scale_by_galore(rank=2, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)).init(PARAMS)
  # Chosen explicitly, the [2, 12] scale is projected as one matrix (in=2, out=12), so r = 2.
  assert state.projector["layers"]["norm"]["scale"].shape == (2, 2)
  assert isinstance(state.projector["layers"]["attn"]["kernel"], optax.MaskedNode)  # 3-D: not chosen
  assert state.mu["layers"]["attn"]["kernel"].shape == (2, 8, 12)
  for kwargs in ({"rank": 0}, {"proj_type": "top"}, {"update_proj_gap": 0}, {"svd": "lanczos"}):
    with pytest.raises(ValueError):
      scale_by_galore(**{"rank": 2, **kwargs})


def test_refresh_cadence_under_jit_without_retracing():
  tx = scale_by_galore(rank=2, update_proj_gap=3)
  params = {"kernel": jnp.zeros((6, 10))}
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state)

  state = tx.init(params)
  previous = state.projector["kernel"]
  for t, g in enumerate(_grads(jax.random.key(0), params, 7)):
    _, state = step(g, state)
    p = state.projector["kernel"]
    changed = not np.allclose(p, previous)
    assert changed == (t % 3 == 0), t
    np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)
    if changed:  # the refresh is the top-2 left singular vectors of this step's gradient (ours: the inputs)
      u = np.linalg.svd(np.asarray(g["kernel"], np.float64))[0][:, :2]
      np.testing.assert_allclose(u @ u.T, p @ p.T, atol=1e-5)
    previous = p
  assert len(traces) == 1
  assert int(state.count) == 7


def test_jit_equals_eager_and_stacks_are_per_slice():
  stacked = {"kernel": jnp.zeros((2, 8, 12))}
  split = {"a": {"kernel": jnp.zeros((8, 12))}, "b": {"kernel": jnp.zeros((8, 12))}}
  tx = scale_by_galore(rank=3, update_proj_gap=2, reset_on_refresh=True)
  s_jit, s_eager, s_split = tx.init(stacked), tx.init(stacked), tx.init(split)
  update = jax.jit(tx.update)
  for g in _grads(jax.random.key(1), stacked, 3):  # refreshes at 0 and 2
    u_jit, s_jit = update(g, s_jit)
    u_eager, s_eager = tx.update(g, s_eager)
    u_split, s_split = update({"a": {"kernel": g["kernel"][0]}, "b": {"kernel": g["kernel"][1]}}, s_split)
    np.testing.assert_allclose(u_jit["kernel"], u_eager["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_jit["kernel"][0], u_split["a"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_jit["kernel"][1], u_split["b"]["kernel"], rtol=1e-5, atol=1e-6)


def test_reset_on_refresh_restarts_adam():
  """With the reset, the update at a refresh step equals a fresh optimizer's first update."""
  params = {"kernel": jnp.zeros((8, 12))}
  grads = _grads(jax.random.key(2), params, 4)
  tx = scale_by_galore(rank=3, update_proj_gap=3, reset_on_refresh=True)
  update, state = jax.jit(tx.update), tx.init(params)
  for g in grads:
    u, state = update(g, state)
  fresh, _ = update(grads[3], tx.init(params))
  np.testing.assert_allclose(u["kernel"], fresh["kernel"], rtol=1e-5, atol=1e-6)
  no_reset = scale_by_galore(rank=3, update_proj_gap=3)
  update, state = jax.jit(no_reset.update), no_reset.init(params)
  for g in grads:
    u, state = update(g, state)
  assert not np.allclose(u["kernel"], fresh["kernel"], atol=1e-3)


def test_matches_optax_contrib_galore_within_a_period():
  """optax.contrib.galore = reverse_std with optax's eps placement: equal at eps=0, before any re-refresh."""
  params = {"w": jnp.zeros((12, 8)), "v": jnp.zeros((6, 10))}
  ours = scale_by_galore(rank=3, update_proj_gap=100, proj_type="reverse_std", eps=0.0, scale=0.5,
                         mask={"w": True, "v": True})
  theirs = optax.contrib.scale_by_galore(rank=3, update_proj_gap=100, scale=0.5,
                                         base_optimizer=optax.scale_by_adam(eps=0.0))
  s1, s2 = ours.init(params), theirs.init(params)
  for g in _grads(jax.random.key(3), params, 4):
    u1, s1 = jax.jit(ours.update)(g, s1)
    u2, s2 = jax.jit(theirs.update)(g, s2)
    for k in params:
      np.testing.assert_allclose(u1[k], u2[k], rtol=2e-5, atol=1e-6)


def test_inject_hyperparams_gives_the_same_steps():
  params = {"kernel": jnp.ones((8, 12)), "bias": jnp.ones(12)}
  schedule = optax.linear_schedule(0.1, 0.01, 5)
  kwargs = dict(rank=2, update_proj_gap=2, scale=0.5, weight_decay=0.1, eps=1e-6)
  plain = galore(schedule, **kwargs)
  injected = optax.inject_hyperparams(galore, static_args=("rank", "update_proj_gap"))(
      learning_rate=schedule, **kwargs)
  p1, p2, s1, s2 = params, params, plain.init(params), injected.init(params)
  for g in _grads(jax.random.key(4), params, 5):
    u1, s1 = jax.jit(plain.update)(g, s1, p1)
    u2, s2 = jax.jit(injected.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for k in params:
    np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)
  assert float(s2.hyperparams["learning_rate"]) == pytest.approx(float(schedule(4)))  # the last step's


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_least_squares_converges(svd):
  """min ||X W - Y||² over a [16, 12] kernel with rank-4 GaLore: the refreshes walk all directions."""
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (64, 16))
  y = x @ jax.random.normal(kw, (16, 12))
  loss = lambda p: jnp.mean(jnp.square(x @ p["kernel"] - y))
  tx = galore(0.05, rank=4, update_proj_gap=20, svd=svd)
  params = {"kernel": jnp.zeros((16, 12))}

  def step(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=400)
  assert float(loss(params)) < 1e-3 * float(loss({"kernel": jnp.zeros((16, 12))}))


def test_randomized_svd_recovers_a_low_rank_subspace_and_signs():
  k1, k2 = jax.random.split(jax.random.key(6))
  scales = jnp.array([5.0, 4.0, 3.0, 2.0, 1.0])
  g = (jax.random.normal(k1, (3, 20, 5)) * scales) @ jax.random.normal(k2, (3, 5, 30))  # rank 5 per slice
  top = jax.jit(pj.top_singular, static_argnums=(1, 2))
  u_full, v_full = top(g, 3, "full")
  u_rand, v_rand = top(g, 3, "randomized", jax.random.key(7))
  np.testing.assert_allclose(u_rand, u_full, atol=1e-4)  # same vectors, signs included
  np.testing.assert_allclose(v_rand, v_full, atol=1e-4)
  idx = jnp.argmax(jnp.abs(v_full), axis=-2)
  assert bool(jnp.all(jnp.take_along_axis(v_full, idx[..., None, :], axis=-2) > 0))
