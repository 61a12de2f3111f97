"""Rank-adaptive adapters: AdaLoRA (PEFT parity: forward, merge, orthogonality penalty, rank allocator),
DyLoRA, SoRA: forward formulas against float64 numpy, trainable-parameter counts against each paper's
formula, and no recompilation of the jitted step when ranks change (capacity is preallocated and masked).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
import peft
from tests import refenv

RS = np.random.RandomState
F64 = np.float64


def _np(x):
  return np.asarray(x, F64)


@pytest.fixture(scope="module")
def tiny_params():
  """The tiny decoder's params, made once for the count tests (D=64, L=2)."""
  import models   # pylint: disable=g-import-not-at-top
  return models.Decoder(models.DecoderConfig.tiny()).init(jax.random.PRNGKey(0))


# =====================================================================================================
# AdaLoRA
# =====================================================================================================
ADA = dict(init_r=4, target_r=2, alpha=3.0, total_step=10, tinit=2, tfinal=3, deltaT=2, beta1=0.85, beta2=0.85,
           orth_reg_weight=0.5)
SHAPES = {"lin1": (6, 5), "lin2": (5, 4)}          # [in, out]
STEPS = 10


def _ada_inputs():
  rng = RS(0)
  r = ADA["init_r"]
  arrays = {"x": rng.normal(size=(3, 6)).astype(np.float32)}
  for m, (i, o) in SHAPES.items():
    arrays[f"{m}__w"] = rng.normal(size=(o, i)).astype(np.float32)        # torch layout
    arrays[f"{m}__A"] = rng.normal(size=(r, i)).astype(np.float32)
    arrays[f"{m}__E"] = rng.normal(size=(r,)).astype(np.float32)
    arrays[f"{m}__B"] = rng.normal(size=(o, r)).astype(np.float32)
    for t in range(STEPS):
      for f, shape in (("A", (r, i)), ("E", (r,)), ("B", (o, r))):
        arrays[f"t{t}__{m}__{f}"] = rng.normal(size=shape).astype(np.float32)
        arrays[f"t{t}__{m}__g{f}"] = rng.normal(size=shape).astype(np.float32)
  return arrays


def _ada_node(arrays, m, prefix="", base=True):
  scale = ADA["alpha"] / (ADA["init_r"] + 1e-5)
  return peft.AdaLoRA(jnp.asarray(arrays[f"{m}__w"].T) if base else None,
                      jnp.asarray(arrays[f"{prefix}{m}__A"].T), jnp.asarray(arrays[f"{prefix}{m}__E"]),
                      jnp.asarray(arrays[f"{prefix}{m}__B"].T), scale=scale,
                      orth_reg_weight=ADA["orth_reg_weight"])


def _ada_tx():
  return optim.adalora_rank_allocator(optax.set_to_zero(), total_step=ADA["total_step"], target_r=ADA["target_r"],
                                      tinit=ADA["tinit"], tfinal=ADA["tfinal"], deltaT=ADA["deltaT"],
                                      beta1=ADA["beta1"], beta2=ADA["beta2"])


@pytest.fixture(scope="module")
def peft_adalora():
  refenv.require()
  arrays = _ada_inputs()
  kw = {k: v for k, v in ADA.items()}
  return arrays, refenv.run("peft_adalora", arrays, steps=STEPS, **kw)


def test_adalora_forward_and_merge_formula():
  """y = x W0 + s x Q^T diag(e) P^T, s = alpha / (init_r + 1e-5), on stacked layers; merge = forward."""
  rng = RS(1)
  L, i, o, r = 2, 6, 5, 4
  w, a, e, b = (rng.normal(size=s).astype(np.float32) for s in ((L, i, o), (L, i, r), (L, r), (L, r, o)))
  node = peft.AdaLoRA(jnp.asarray(w), jnp.asarray(a), jnp.asarray(e), jnp.asarray(b), scale=3.0 / (r + 1e-5))
  x = rng.normal(size=(3, i)).astype(np.float32)
  for l in range(L):
    want = _np(x) @ _np(w[l]) + 3.0 / (r + 1e-5) * (_np(x) @ (_np(a[l]) * _np(e[l])[None]) @ _np(b[l]))
    got = jax.tree.map(lambda z: z[l], node).dot(jnp.asarray(x))
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(x) @ _np(node.materialize()[l]), want, rtol=1e-5, atol=1e-5)
  made = peft.get_adapter("adalora")(jnp.asarray(w), peft.AdapterSpec("adalora", alpha=3.0, options={"init_r": 4}),
                                     jax.random.PRNGKey(0), "k")
  assert float(jnp.abs(made.e).max()) == 0.0 and made.rank == 4            # PEFT's init: Λ = 0
  np.testing.assert_allclose(0.02, float(jnp.std(made.a)), rtol=0.3)
  np.testing.assert_array_equal(np.asarray(made.materialize()), w)


def test_adalora_orthogonality_formula():
  """w / (2 n) sum_modules (||Q Q^T - I||_F + ||P^T P - I||_F), pooled over nodes (stacked = L modules)."""
  rng = RS(2)
  n1 = peft.AdaLoRA(None, *(jnp.asarray(rng.normal(size=s)) for s in ((2, 6, 3), (2, 3), (2, 3, 5))),
                    orth_reg_weight=0.7)
  n2 = peft.AdaLoRA(None, *(jnp.asarray(rng.normal(size=s)) for s in ((4, 3), (3,), (3, 7))), orth_reg_weight=0.7)
  terms = []
  for a, b in [(n1.a[0], n1.b[0]), (n1.a[1], n1.b[1]), (n2.a, n2.b)]:
    q, p = _np(a).T, _np(b).T                 # Q [r, in], P [out, r]
    terms += [np.linalg.norm(q @ q.T - np.eye(3)), np.linalg.norm(p.T @ p - np.eye(3))]
  want = 0.7 * np.mean(terms)
  np.testing.assert_allclose(float(peft.regularizer({"x": n1, "y": n2})), want, rtol=1e-6)
  assert peft.regularizer({"x": jnp.ones(3)}) is None


def test_adalora_budget_schedule_formula():
  """The cubic schedule: b_0 through tinit, int((b_0 - b_T) m^3 + b_T) with m = 1 - (t - tinit)/(T - tf - ti),
  b_T after T - tfinal; allocations every deltaT steps in the middle phase and every step after."""
  budget, alloc = optim.adalora_budget_table(48, 16, 20, tinit=3, tfinal=4, deltaT=3)
  for t in range(21):
    m = 1 - (t - 3) / (20 - 4 - 3)
    want = 48 if t <= 3 else 16 if t > 16 else math.floor(32 * m ** 3 + 16)
    assert budget[t] == want and alloc[t] == (t > 16 or (3 < t <= 16 and t % 3 == 0)), t
  assert np.all(np.diff(budget) <= 0)


def test_adalora_trainable_count(tiny_params):
  """init_r (in + out + 1) per adapted matrix (Q, P and Λ)."""
  params = tiny_params
  spec = peft.AdapterSpec("adalora", options={"init_r": 5})
  adapted = peft.apply(params, {("q_proj", "down_proj"): spec})
  trainable, _ = peft.split(adapted)
  want = 0
  for path in ("layers/attn/q_proj/kernel", "layers/mlp/down_proj/kernel"):
    L, i, o = peft.flatten(params)[path].shape
    want += L * 5 * (i + o + 1)
  assert peft.count(trainable) == want


@pytest.mark.parity
def test_adalora_matches_peft(peft_adalora):
  """PEFT 0.21.2 on the same weights: outputs unmerged and merged, the orthogonality penalty, and Λ and the
  budget after every `update_and_allocate(t)` of a 10-step schedule (warmup, cubic phase with deltaT=2,
  the forced final allocation and the fixed pattern)."""
  arrays, ref = peft_adalora
  nodes = {m: _ada_node(arrays, m) for m in SHAPES}
  x = jnp.asarray(arrays["x"])
  y = nodes["lin2"].dot(nodes["lin1"].dot(x))
  np.testing.assert_allclose(np.asarray(y), ref["y"], rtol=1e-5, atol=1e-6)
  merged = {m: n.materialize() for m, n in nodes.items()}
  np.testing.assert_allclose(np.asarray(x @ merged["lin1"] @ merged["lin2"]), ref["y_merged"], rtol=1e-5,
                             atol=1e-6)
  for m in SHAPES:
    np.testing.assert_allclose(np.asarray(merged[m]).T, ref[f"{m}__merged"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(peft.regularizer(nodes)), float(ref["orth"]), rtol=1e-5)

  tx = _ada_tx()
  trainable = {m: _ada_node(arrays, m, "t0__", base=False) for m in SHAPES}
  state = tx.init(trainable)
  update = jax.jit(tx.update)
  pruned_any = False
  for t in range(STEPS):
    p = {m: _ada_node(arrays, m, f"t{t}__", base=False) for m in SHAPES}
    g = {m: p[m].replace(a=jnp.asarray(arrays[f"t{t}__{m}__gA"].T), e=jnp.asarray(arrays[f"t{t}__{m}__gE"]),
                         b=jnp.asarray(arrays[f"t{t}__{m}__gB"].T)) for m in SHAPES}
    u, state = update(g, state, p)
    new = optax.apply_updates(p, u)
    assert int(state.budget) == int(ref[f"t{t}__budget"]), t
    for m in SHAPES:
      np.testing.assert_array_equal(np.asarray(new[m].e), ref[f"t{t}__{m}__E"], err_msg=f"step {t} {m}")
      pruned_any |= bool(np.any(ref[f"t{t}__{m}__E"] == 0))
  assert pruned_any
  assert sum(int(k.sum()) for k in state.keep) == ADA["target_r"] * len(SHAPES)


def test_adalora_budget_changes_never_recompile():
  """One compilation of the allocator's update across every budget of the schedule."""
  tx = _ada_tx()
  rng = RS(3)
  p = {m: peft.AdaLoRA(None, jnp.asarray(rng.normal(size=(i, 4)), jnp.float32), jnp.ones(4, jnp.float32),
                       jnp.asarray(rng.normal(size=(4, o)), jnp.float32)) for m, (i, o) in SHAPES.items()}
  state = tx.init(p)
  update = jax.jit(tx.update)
  budgets, ranks = [], []
  for _ in range(ADA["total_step"] + 2):
    g = jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32), p)
    u, state = update(g, state, p)
    budgets.append(int(state.budget))
    ranks.append(sum(int(k.sum()) for k in state.keep))
  assert len(set(budgets)) >= 3 and ranks[-1] == ADA["target_r"] * 2
  assert update._cache_size() == 1


@pytest.mark.slow
def test_adalora_training_budget_shrinks_to_target(tmp_path):
  """configs/lora.py:adapter=adalora through the trainer: the orthogonality penalty is logged, and the
  allocator's budget ends at target_r per module with exactly that many nonzero singular values."""
  import train_lib   # pylint: disable=g-import-not-at-top
  from configs import lora   # pylint: disable=g-import-not-at-top
  c = lora.get_config("model=tiny,smoke,adapter=adalora")
  c.peft.targets = "q_proj,v_proj"
  c.peft.options.init_r = 4
  c.peft.options.target_r = 2
  c.peft.options.tinit = 2
  c.peft.options.tfinal = 2
  c.eval_before = False
  c.eval.num_examples = 0
  c.eval.num_loss_batches = 0
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  state = summary["state"]
  budget, ranks = optim.adalora_budget(state.opt_state)
  modules = 2 * 2                                       # q and v in 2 layers
  assert int(budget) == 2 * modules
  assert sum(int(r.sum()) for r in ranks) == 2 * modules
  es = [n.e for n in jax.tree.leaves(state.params, is_leaf=peft.is_adapter) if isinstance(n, peft.AdaLoRA)]
  assert sum(int((e != 0).sum()) for e in es) == 2 * modules
  import json   # pylint: disable=g-import-not-at-top
  import os   # pylint: disable=g-import-not-at-top
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    logged = [json.loads(l) for l in f]
  assert any("adapter_regularizer" in m and m["adapter_regularizer"] > 0 for m in logged)
  budgets = [m["adalora/budget"] for m in logged if "adalora/budget" in m]     # the hook's log, every 2 steps
  assert budgets[0] == 4 * modules and budgets[-1] < budgets[0] and all(np.diff(budgets) <= 0)


# =====================================================================================================
# DyLoRA
# =====================================================================================================
def _dylora(r=6, i=5, o=4, seed=4, **opts):
  rng = RS(seed)
  w = jnp.asarray(rng.normal(size=(i, o)), jnp.float32)
  n = peft.get_adapter("dylora")(w, peft.AdapterSpec("dylora", rank=r, alpha=3.0, options=opts),
                                 jax.random.PRNGKey(seed), "k")
  return n.replace(b=jnp.asarray(rng.normal(size=(r, o)), jnp.float32))     # off the B = 0 init


def _dylora_want(n, x, b):
  """x W0 + (alpha / r) (x A[:, :b] c)(c B[:b]), c = sqrt(r / b) (the reference scales both factors)."""
  r = n.rank
  c = math.sqrt(r / b)
  return _np(x) @ _np(n.base) + n.scale * ((_np(x) @ (_np(n.a)[:, :b] * c)) @ (c * _np(n.b)[:b]))


def test_dylora_forward_formula_every_rank():
  n = _dylora()
  x = jnp.asarray(RS(5).normal(size=(3, 5)), jnp.float32)
  assert n.scale == 3.0 / 6
  for b in range(1, 7):
    want = _dylora_want(n, x, b)
    np.testing.assert_allclose(_np(n.replace(step_rank=jnp.int32(b)).dot(x)), want, rtol=1e-5, atol=1e-5)
    at_b = peft.dylora_at_rank({"k": n}, b)["k"]                   # eval / merge at rank b
    np.testing.assert_allclose(_np(at_b.dot(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(x) @ _np(at_b.materialize()), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_np(n.dot(x)), _dylora_want(n, x, 6), rtol=1e-5, atol=1e-5)   # eval_rank = r_max
  with pytest.raises(ValueError, match="dylora"):
    _dylora(eval_rank=7)


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_gradients_frozen_mode(frozen):
  """Frozen (the reference's training mode): only A[:, b-1] and B[b-1] get a gradient; else A[:, :b], B[:b]."""
  n = _dylora(frozen=frozen).replace(step_rank=jnp.int32(3))
  x = jnp.asarray(RS(6).normal(size=(3, 5)), jnp.float32)
  g = jax.grad(lambda a, b: jnp.sum(n.replace(a=a, b=b).dot(x) ** 2), argnums=(0, 1))(n.a, n.b)
  live = np.abs(np.asarray(g[0])).sum(0) > 0, np.abs(np.asarray(g[1])).sum(1) > 0
  want = np.arange(6) == 2 if frozen else np.arange(6) < 3
  np.testing.assert_array_equal(live[0], want)
  np.testing.assert_array_equal(live[1], want)


def test_dylora_trainable_count(tiny_params):
  """r_max (in + out) per adapted matrix, as LoRA at r_max."""
  params = tiny_params
  adapted = peft.apply(params, {("q_proj", "v_proj"): peft.AdapterSpec("dylora", rank=4)})
  want = sum(L * 4 * (i + o) for L, i, o in (peft.flatten(params)[f"layers/attn/{m}_proj/kernel"].shape
                                             for m in ("q", "v")))
  assert peft.count(peft.split(adapted)[0]) == want


def test_dylora_rank_draws_never_recompile():
  """One rank per step shared by every node, drawn inside the jitted step: one compilation for all draws."""
  params = {"l1": _dylora(r=6, i=5, o=5, seed=7), "l2": _dylora(r=6, i=5, o=4, seed=8)}
  trainable, frozen = peft.split(params)
  x = jnp.asarray(RS(9).normal(size=(3, 5)), jnp.float32)

  @jax.jit
  def step(trainable, rng):
    def loss(t):
      p = peft.with_dropout_rng(peft.combine(t, frozen), rng)
      return jnp.sum(p["l2"].dot(p["l1"].dot(x)) ** 2), (p["l1"].step_rank, p["l2"].step_rank)
    return jax.grad(loss, has_aux=True)(trainable)

  drawn = []
  for s in range(12):
    _, (r1, r2) = step(trainable, jax.random.PRNGKey(s))
    assert int(r1) == int(r2)
    drawn.append(int(r1))
  assert len(set(drawn)) >= 3 and min(drawn) >= 1 and max(drawn) <= 6
  assert step._cache_size() == 1


# =====================================================================================================
# SoRA
# =====================================================================================================
def _sora(r=5, i=6, o=4, lead=(), seed=10, **opts):
  rng = RS(seed)
  w = jnp.asarray(rng.normal(size=lead + (i, o)), jnp.float32)
  n = peft.get_adapter("sora")(w, peft.AdapterSpec("sora", rank=r, alpha=2.0, options=opts),
                               jax.random.PRNGKey(seed), "k")
  return n.replace(b=jnp.asarray(rng.normal(size=lead + (r, o)), jnp.float32))


def test_sora_forward_and_l1_formula():
  """y = x W0 + (alpha / r) ((x A) ⊙ g) B; loss term sparse_lambda * sum|g| / #gates over all nodes."""
  n = _sora(sparse_lambda=0.3)
  x = jnp.asarray(RS(11).normal(size=(3, 6)), jnp.float32)
  want = _np(x) @ _np(n.base) + 0.4 * (((_np(x) @ _np(n.a)) * _np(n.g)) @ _np(n.b))
  np.testing.assert_allclose(_np(n.dot(x)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_np(x) @ _np(n.materialize()), want, rtol=1e-5, atol=1e-5)
  m = _sora(r=3, i=4, o=4, lead=(2,), seed=12, sparse_lambda=0.3)
  gates = np.concatenate([_np(n.g).ravel(), _np(m.g).ravel()])
  np.testing.assert_allclose(float(peft.regularizer({"n": n, "m": m})), 0.3 * np.abs(gates).sum() / gates.size,
                             rtol=1e-6)


def test_sora_proximal_step_formula():
  """The gates after the step are soft_threshold(g + adam update, lambda); A, B get the Adam update alone.
  `reference=True` is the reference's in-place sequence (zeroes lambda < |w| < 2 lambda)."""
  n = _sora(r=8).replace(base=None)
  grads = jax.tree.map(lambda z: jnp.asarray(RS(13).normal(size=z.shape), jnp.float32), n)
  lam = 0.05
  for reference in (False, True):
    tx = optax.chain(optax.adam(0.04), optim.sora_proximal(lam, reference=reference))
    u, _ = tx.update(grads, tx.init(n), n)
    plain, _ = optax.adam(0.04).update(grads, optax.adam(0.04).init(n), n)
    w = _np(n.g) + _np(plain.g)
    if reference:
      want = w.copy()
      want[want > lam] -= lam
      want[want < -lam] += lam
      want[np.abs(want) < lam] = 0.0
    else:
      want = np.sign(w) * np.maximum(np.abs(w) - lam, 0.0)
    np.testing.assert_allclose(_np(n.g) + _np(u.g), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(u.a), np.asarray(plain.a))
  assert np.any(want == 0) and np.any(want != 0)


def test_sora_prune_drops_zero_gates():
  """Pruned to LoRA of rank max_layers(#live gates), same outputs, fewer parameters."""
  n = _sora(r=5, i=6, o=4, lead=(2,), seed=14)
  g = np.asarray(n.g).copy()
  g[0, [0, 2, 3]] = 0.0
  g[1, [1, 4]] = 0.0
  n = n.replace(g=jnp.asarray(g))
  pruned = peft.sora_prune({"k": n})["k"]
  assert isinstance(pruned, peft.LoRA) and pruned.rank == 3
  np.testing.assert_allclose(np.asarray(pruned.materialize()), np.asarray(n.materialize()), rtol=1e-6, atol=1e-6)
  x = jnp.asarray(RS(15).normal(size=(3, 6)), jnp.float32)
  for l in range(2):
    layer = lambda z: jax.tree.map(lambda v: v[l], z)
    np.testing.assert_allclose(np.asarray(layer(pruned).dot(x)), np.asarray(layer(n).dot(x)), rtol=1e-5,
                               atol=1e-5)


def test_sora_trainable_count(tiny_params):
  """r (in + out + 1) per adapted matrix: A, B and the gates."""
  params = tiny_params
  adapted = peft.apply(params, {("k_proj", "up_proj"): peft.AdapterSpec("sora", rank=4)})
  flat = peft.flatten(params)
  want = sum(L * 4 * (i + o + 1) for L, i, o in (flat["layers/attn/k_proj/kernel"].shape,
                                                 flat["layers/mlp/up_proj/kernel"].shape))
  assert peft.count(peft.split(adapted)[0]) == want


# =====================================================================================================
# IncreLoRA
# =====================================================================================================
def _increlora(lead=(), seed=16, **opts):
  rng = RS(seed)
  w = jnp.asarray(rng.normal(size=lead + (6, 5)), jnp.float32)
  o = dict(init_r=1, target_r=2, add_r=1, max_r=4, top_h=1)
  o.update(opts)
  n = peft.get_adapter("increlora")(w, peft.AdapterSpec("increlora", alpha=2.0, options=o),
                                    jax.random.PRNGKey(seed), "k")
  return n.replace(e=jnp.asarray(rng.normal(size=n.e.shape), jnp.float32))


def test_increlora_forward_and_score_formula():
  """y = x W0 + x alpha/(ranknum + 1e-5) Q^T diag(e m + 1e-5 m_res) P^T; the probe's gradient is
  sum|ΔW ⊙ dL/dΔW| / sqrt(#ΔW) with dL/dΔW = x^T dL/dy."""
  n = _increlora()
  x = jnp.asarray(RS(17).normal(size=(3, 6)), jnp.float32)
  m, res = _np(n.used), _np(n.reserve)
  np.testing.assert_array_equal(m, [1, 0, 0, 0])
  np.testing.assert_array_equal(res, [0, 1, 0, 0])
  dw = 2.0 / (1 + 1e-5) * (_np(n.a) * (_np(n.e) * m + 1e-5 * res)) @ _np(n.b)
  want = _np(x) @ (_np(n.base) + dw)
  np.testing.assert_allclose(_np(n.dot(x)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_np(x) @ _np(n.materialize()), want, rtol=1e-5, atol=1e-5)
  gp = jax.grad(lambda p: jnp.sum(n.replace(probe=p).dot(x) ** 2))(n.probe)
  dldy = 2 * want
  np.testing.assert_allclose(float(gp), np.abs(dw * (_np(x).T @ dldy)).sum() / math.sqrt(dw.size), rtol=1e-4)
  g = jax.grad(lambda e: jnp.sum(n.replace(e=e).dot(x) ** 2))(n.e)
  np.testing.assert_array_equal(np.asarray(g) != 0, [True, False, False, False])   # only used ranks train e


def test_increlora_growth_and_count():
  """A growth round gives the top_h highest-scoring modules their reserve; trainable parameters in use are
  sum_modules ranknum (in + out + 1), the paper's count; the scaling follows ranknum."""
  n = _increlora(lead=(3,), top_h=2)
  frozen, trainable = peft.split({"k": n})[1]["k"], peft.split({"k": n})[0]["k"]
  scores = [np.array([0.3, 0.9, 0.5])]
  new_f, new_p, grown = optim.increlora_grow([frozen], [trainable], scores, target_r=2, top_h=2, add_r=1)
  assert grown == 2
  used = np.asarray(new_f[0].used)
  np.testing.assert_array_equal(used.sum(-1), [1, 2, 2])
  np.testing.assert_array_equal(np.asarray(new_f[0].reserve), [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])
  np.testing.assert_allclose(np.asarray(new_p[0].e)[1:, 1], 1e-5)
  in_use = int((used.sum(-1) * (6 + 5 + 1)).sum())
  assert in_use == (1 + 2 + 2) * 12
  new_f, _, grown = optim.increlora_grow(new_f, new_p, [np.array([0.9, 0.1, 0.1])], target_r=2, top_h=2, add_r=1)
  assert grown == 1 and np.asarray(new_f[0].used).sum() == 6 and np.asarray(new_f[0].reserve).sum() == 0


def test_increlora_growth_never_recompiles():
  """Steps before and after growth rounds run one compilation; scores reach the EMAs, probes never move."""
  n = _increlora(lead=(2,), top_h=1)
  trainable, frozen = peft.split({"k": n})
  tx = optim.increlora_score_emas(optax.adam(1e-2))
  state = tx.init(trainable)
  x = jnp.asarray(RS(18).normal(size=(3, 6)), jnp.float32)

  @jax.jit
  def step(trainable, frozen, state):
    def loss(t):
      node = peft.combine(t, frozen)["k"]
      return sum(jnp.sum(jax.tree.map(lambda z: z[l], node).dot(x) ** 2) for l in range(2))
    g = jax.grad(loss)(trainable)
    u, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, u), state

  for _ in range(3):
    for _ in range(2):
      trainable, state = step(trainable, frozen, state)
    scores = [np.asarray(state.ipt[0]) * np.asarray(state.unc[0])]
    new_f, new_p, _ = optim.increlora_grow([frozen["k"]], [trainable["k"]], scores, target_r=3, top_h=1, add_r=1)
    frozen, trainable = {"k": new_f[0]}, {"k": new_p[0]}
  assert float(np.asarray(frozen["k"].used).sum()) == 2 + 3 and np.all(np.asarray(state.ipt[0]) > 0)
  assert float(np.abs(np.asarray(trainable["k"].probe)).max()) == 0.0
  assert step._cache_size() == 1


@pytest.mark.slow
def test_increlora_training_grows_to_target(tmp_path):
  """configs/lora.py:adapter=increlora through the trainer: the host hook grows the ranks to target_r per
  module (4 modules from 1 to 2 ranks, 2 per round) and logs the total; the frozen masks are checkpointed."""
  import json   # pylint: disable=g-import-not-at-top
  import os   # pylint: disable=g-import-not-at-top
  import train_lib   # pylint: disable=g-import-not-at-top
  from configs import lora   # pylint: disable=g-import-not-at-top
  c = lora.get_config("model=tiny,smoke,adapter=increlora")
  c.peft.targets = "q_proj,v_proj"
  for k, v in dict(init_r=1, target_r=2, add_r=1, top_h=2, init_warmup=1, incre_interval=2, max_r=4).items():
    c.peft.options[k] = v
  c.eval_before = False
  c.eval.num_examples = 0
  c.eval.num_loss_batches = 0
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  used = [n.used for n in jax.tree.leaves(summary["frozen"], is_leaf=peft.is_adapter) if isinstance(n, peft.IncreLoRA)]
  assert float(sum(np.asarray(u).sum() for u in used)) == 2 * 4
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    totals = [m["increlora/total_rank"] for m in map(json.loads, f) if "increlora/total_rank" in m]
  assert totals[0] == 6 and totals[-1] == 8


def test_adalora_export_import_round_trip(tiny_params, tmp_path):
  """PEFT's ADALORA format (lora_A [r, in], lora_E [r, 1], lora_B [out, r]) written and read back; PEFT
  loading it with equal logits is the `adalora` row of test_peft_export.py."""
  spec = peft.AdapterSpec("adalora", alpha=6.0, options={"init_r": 3, "total_step": 10, "target_r": 2})
  adapted = peft.apply(tiny_params, {("q_proj", "v_proj"): spec})
  adapted = jax.tree.map(lambda n: n.replace(e=n.e + 0.5) if isinstance(n, peft.AdaLoRA) else n, adapted,
                         is_leaf=peft.is_adapter)
  config = peft.export_adapter(str(tmp_path), adapted, spec)
  assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 3, 2, 10)
  back = peft.import_adapter(str(tmp_path), tiny_params)
  for p, n in peft.flatten(adapted).items():
    np.testing.assert_allclose(np.asarray(peft.flatten(back)[p]), np.asarray(n), rtol=1e-6, err_msg=p)
  n0 = [n for n in jax.tree.leaves(back, is_leaf=peft.is_adapter) if isinstance(n, peft.AdaLoRA)][0]
  assert abs(n0.scale - 6.0 / (3 + 1e-5)) < 1e-9
