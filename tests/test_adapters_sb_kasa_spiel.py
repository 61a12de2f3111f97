"""LoRA-SB (peft/_lorasb.py), KaSA (peft/_kasa.py) and SpIEL (optim/_spiel.py).

LoRA-SB: the init from a known gradient against a float64 evaluation of its formula (and LoRA-XS's weight
init). KaSA: the truncated base, the forward and both regularisers against float64 and against PEFT 0.21's
KaSA variant. SpIEL: prune/regrow on hand-made arrays, and whole runs against a float64 re-implementation of
the reference's SftSelector + SftAdamW (which indices survive, which enter, deltas of entering entries 0,
the count fixed), with one compilation across every reselection. Trainable counts against each paper's
formula; the trainer runs are marked slow.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
import peft
from optim import _spiel
from peft import _kasa, _lorasb
from tests import refenv

F64 = np.float64


def _np(x):
  return np.asarray(x, F64)


@pytest.fixture(scope="module")
def tiny_params():
  import models   # pylint: disable=g-import-not-at-top
  return models.Decoder(models.DecoderConfig.tiny()).init(jax.random.PRNGKey(0))


def _count_want(params, paths, per_matrix):
  want = 0
  for path in paths:
    L, i, o = peft.flatten(params)[path].shape
    want += L * per_matrix(i, o)
  return want


PATHS = ("layers/attn/q_proj/kernel", "layers/mlp/down_proj/kernel")


# =====================================================================================================
# KaSA
# =====================================================================================================
def _truncated64(w, r):
  u, s, vt = np.linalg.svd(_np(w), full_matrices=False)
  keep = min(w.shape) - r
  return (u[:, :keep] * s[:keep]) @ vt[:keep]


def _kasa_reg64(a, d, b, beta, gamma):
  r = d.shape[-1]
  fro = lambda m: np.sqrt(np.sum(m * m))
  return beta * np.sum(d * d) + gamma * (fro(b @ b.T - np.eye(r)) + fro(a.T @ a - np.eye(r)))


def test_kasa_truncation_forward_and_regularizers_formula():
  """Stacked [2, 9, 7] kernel, r = 3: base = W without its 3 smallest singular components (float64 SVD);
  output at init (B = 0) = the truncated base's; y = x W_base + s ((x A) d) B; merge = forward; the
  regulariser = sum over layers of beta ||d||^2 + gamma (||B B^T - I||_F + ||A^T A - I||_F)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 9, 7)).astype(np.float32)
  r, alpha, beta, gamma = 3, 6.0, 0.3, 0.7
  spec = peft.AdapterSpec("kasa", rank=r, alpha=alpha, options={"beta": beta, "gamma": gamma})
  node = peft.get_adapter("kasa")(jnp.asarray(w), spec, jax.random.PRNGKey(1), "k")
  for l in range(2):
    np.testing.assert_allclose(_np(node.base[l]), _truncated64(w[l], r), atol=2e-5)
    assert np.linalg.matrix_rank(_np(node.base[l]), tol=1e-4) == 7 - r
  x = rng.normal(size=(4, 9)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(node.b), 0.0)
  for l in range(2):
    one = jax.tree.map(lambda z: z[l], node)
    np.testing.assert_allclose(_np(one.dot(jnp.asarray(x))), _np(x) @ _truncated64(w[l], r), rtol=1e-5, atol=2e-5)
  node = node.replace(b=jnp.asarray(rng.normal(size=(2, r, 7)), jnp.float32),
                      a=jnp.asarray(rng.normal(size=(2, 9, r)), jnp.float32))
  a, d, b = _np(node.a), _np(node.d), _np(node.b)
  for l in range(2):
    one = jax.tree.map(lambda z: z[l], node)
    want = _np(x) @ _np(node.base[l]) + (alpha / r) * ((_np(x) @ a[l]) * d[l]) @ b[l]
    np.testing.assert_allclose(_np(one.dot(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(x) @ _np(node.materialize()[l]), want, rtol=1e-5, atol=1e-5)
  want_reg = sum(_kasa_reg64(a[l], d[l], b[l], beta, gamma) for l in range(2))
  np.testing.assert_allclose(float(peft.regularizer({"k": node})), want_reg, rtol=1e-6)
  # Only A, d and B train.
  trainable, _ = peft.split({"k": node})
  assert trainable["k"].base is None and trainable["k"].d is not None


def test_kasa_trainable_count(tiny_params):
  """r (in + out + 1) per adapted matrix (ΔV, ΔU and the r singular values)."""
  adapted = peft.apply(tiny_params, {("q_proj", "down_proj"): peft.AdapterSpec("kasa", rank=5)})
  trainable, _ = peft.split(adapted)
  assert peft.count(trainable) == _count_want(tiny_params, PATHS, lambda i, o: 5 * (i + o + 1))


def test_kasa_rejects_rank_without_a_kept_component():
  with pytest.raises(ValueError, match="KaSA needs r < min"):
    peft.get_adapter("kasa")(jnp.ones((4, 3)), peft.AdapterSpec("kasa", rank=3), jax.random.PRNGKey(0), "k")


def test_kasa_export_import_round_trip(tiny_params, tmp_path):
  """PEFT's LoRA format with `lora_diag` and `kasa_config`, read back onto the original model (the import
  truncates the base again, as PEFT does on load); PEFT loading it with equal logits is the `kasa` row of
  test_peft_export.py."""
  spec = peft.AdapterSpec("kasa", rank=4, alpha=8.0, options={"beta": 0.5, "gamma": 0.25})
  adapted = peft.apply(tiny_params, {("q_proj", "down_proj"): spec})
  adapted = jax.tree.map(lambda n: n.replace(b=n.b + 0.1) if isinstance(n, peft.KaSA) else n, adapted,
                         is_leaf=peft.is_adapter)
  config = peft.export_adapter(str(tmp_path), adapted, spec)
  assert config["kasa_config"] == {"beta": 0.5, "gamma": 0.25} and config["peft_type"] == "LORA"
  back = peft.import_adapter(str(tmp_path), tiny_params)
  assert isinstance(back["layers"]["attn"]["q_proj"]["kernel"], peft.KaSA)
  for p, x in peft.flatten(adapted).items():
    np.testing.assert_allclose(np.asarray(peft.flatten(back)[p]), np.asarray(x), rtol=1e-5, atol=1e-5, err_msg=p)


KASA = dict(r=3, alpha=6.0, beta=1e-2, gamma=1e-1)
KASA_SHAPES = {"lin1": (7, 6), "lin2": (6, 5)}      # [in, out]


@pytest.fixture(scope="module")
def peft_kasa():
  refenv.require()
  rng = np.random.default_rng(3)
  r = KASA["r"]
  arrays = {"x": rng.normal(size=(4, 7)).astype(np.float32)}
  for m, (i, o) in KASA_SHAPES.items():
    arrays[f"{m}__w"] = rng.normal(size=(o, i)).astype(np.float32)
    arrays[f"{m}__A"] = rng.normal(size=(r, i)).astype(np.float32)
    arrays[f"{m}__B"] = rng.normal(size=(o, r)).astype(np.float32)
    arrays[f"{m}__diag"] = rng.normal(size=(r,)).astype(np.float32)
  return arrays, refenv.run("peft_kasa", arrays, **KASA)


@pytest.mark.parity
def test_kasa_matches_peft(peft_kasa):
  """PEFT 0.21.2's KaSA on the same weights: the truncated base, outputs unmerged and merged, and
  `_get_kasa_loss` (float32, relative 1e-5)."""
  arrays, ref = peft_kasa
  spec = peft.AdapterSpec("kasa", rank=KASA["r"], alpha=KASA["alpha"],
                          options={"beta": KASA["beta"], "gamma": KASA["gamma"]})
  nodes = {}
  for m in KASA_SHAPES:
    n = peft.get_adapter("kasa")(jnp.asarray(arrays[f"{m}__w"].T), spec, jax.random.PRNGKey(0), m)
    nodes[m] = n.replace(a=jnp.asarray(arrays[f"{m}__A"].T), b=jnp.asarray(arrays[f"{m}__B"].T),
                         d=jnp.asarray(arrays[f"{m}__diag"]))
    np.testing.assert_allclose(np.asarray(nodes[m].base).T, ref[f"{m}__base"], rtol=1e-5, atol=1e-5)
  x = jnp.asarray(arrays["x"])
  np.testing.assert_allclose(np.asarray(nodes["lin2"].dot(nodes["lin1"].dot(x))), ref["y"], rtol=1e-5, atol=1e-5)
  merged = {m: n.materialize() for m, n in nodes.items()}
  np.testing.assert_allclose(np.asarray(x @ merged["lin1"] @ merged["lin2"]), ref["y_merged"], rtol=1e-5, atol=1e-5)
  for m in KASA_SHAPES:
    np.testing.assert_allclose(np.asarray(merged[m]).T, ref[f"{m}__merged"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(peft.regularizer(nodes)), float(ref["loss"]), rtol=1e-5)


# =====================================================================================================
# LoRA-SB
# =====================================================================================================
def _lorasb_problem(rng, n_in=14, n_out=10):
  w = rng.normal(size=(n_in, n_out)).astype(np.float32)
  xs = [rng.normal(size=(8, n_in)).astype(np.float32) for _ in range(3)]
  ys = [rng.normal(size=(8, n_out)).astype(np.float32) for _ in range(3)]
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"]["kernel"] - b["y"]) ** 2)
  g = sum(2 * _np(x).T @ (_np(x) @ _np(w) - y) / y.size for x, y in zip(xs, ys)) / len(xs)
  return w, [{"x": x, "y": y} for x, y in zip(xs, ys)], loss, g


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_lorasb_init_formula_float64(optimizer):
  """G = mean gradient over 3 batches; ΔW_1 = -eta sign(G) (adam) or -eta G (sgd); s A R B = the rank-r
  truncated SVD of ΔW_1 (float64), A and B^T orthonormal, R = diag(S_r) / s; the base is unchanged, so
  the output at init is x (W0 + [ΔW_1]_r), one simulated full fine-tuning step."""
  rng = np.random.default_rng(5)
  w, batches, loss, g = _lorasb_problem(rng)
  r, alpha, eta = 3, 12.0, 0.01
  params = peft.apply({"w": {"kernel": jnp.asarray(w)}},
                      {"w/kernel": peft.AdapterSpec("lorasb", rank=r, alpha=alpha, init="lorasb")})
  out = _lorasb.lorasb_init(params, loss, batches, lr=eta, optimizer=optimizer)
  node = out["w"]["kernel"]
  assert np.min(np.abs(g)) > 1e-4                     # no sign decided by float32 rounding
  upd = -eta * (np.sign(g) if optimizer == "adam" else g)
  u, s, vt = np.linalg.svd(upd)
  want = (u[:, :r] * s[:r]) @ vt[:r]
  scale = alpha / r
  a, rr, b = _np(node.a), _np(node.r), _np(node.b)
  np.testing.assert_allclose(scale * a @ rr @ b, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  np.testing.assert_allclose(a.T @ a, np.eye(r), atol=1e-5)
  np.testing.assert_allclose(b @ b.T, np.eye(r), atol=1e-5)
  np.testing.assert_allclose(rr, np.diag(s[:r] / scale), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(node.base), w)
  x = batches[0]["x"]
  np.testing.assert_allclose(_np(node.dot(jnp.asarray(x))), _np(x) @ (_np(w) + want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_np(node.materialize()), _np(w) + want, rtol=1e-5, atol=1e-6)


def test_lorasb_first_step_on_r_is_the_projected_full_gradient():
  """With only R trained, dL/dR = s A^T G B^T, so an update of R moves W by s A (ΔR) B, inside the span of the
  top-r directions of the first update: the property LoRA-SB's init is built for (paper §4)."""
  rng = np.random.default_rng(6)
  w, batches, loss, _ = _lorasb_problem(rng)
  params = peft.apply({"w": {"kernel": jnp.asarray(w)}},
                      {"w/kernel": peft.AdapterSpec("lorasb", rank=2, alpha=4.0, init="lorasb")})
  out = _lorasb.lorasb_init(params, loss, batches, lr=0.01)
  trainable, frozen = peft.split(out)
  assert set(peft.flatten(trainable)) == {"w/kernel/r"}
  gr = jax.grad(lambda t: loss(peft.merge(peft.combine(t, frozen)), batches[0]))(trainable)["w"]["kernel"].r
  node = out["w"]["kernel"]
  gw = _np(jax.grad(lambda p: loss(p, batches[0]))(peft.merge(out))["w"]["kernel"])
  np.testing.assert_allclose(_np(gr), 2.0 * _np(node.a).T @ gw @ _np(node.b).T, rtol=1e-5, atol=1e-7)


def test_lorasb_xs_weight_init_and_identity():
  """Without the data init the node is LoRA-XS: A = U_r S_r, B = V_r^T from the SVD of W0 (float64), R ~
  N(0, sigma^2); sigma = 0 gives the base's output exactly."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=(2, 9, 6)).astype(np.float32)
  spec = peft.AdapterSpec("lorasb", rank=3, alpha=3.0, options={"xs_sigma": 0.0})
  node = peft.get_adapter("lorasb")(jnp.asarray(w), spec, jax.random.PRNGKey(0), "k")
  for l in range(2):
    u, s, vt = np.linalg.svd(_np(w[l]), full_matrices=False)
    ab = _np(node.a[l]) @ _np(node.b[l])                            # sign-free: U_r S_r V_r^T
    np.testing.assert_allclose(ab, (u[:, :3] * s[:3]) @ vt[:3], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(node.materialize()), w)
  noisy = peft.get_adapter("lorasb")(jnp.asarray(w), spec.replace(options={}), jax.random.PRNGKey(0), "k")
  assert 1e-6 < float(jnp.std(noisy.r)) < 2e-5                    # the reference's sigma = 1e-5


@pytest.mark.parametrize("method", ["lorasb", "kasa"])
def test_dropout_reaches_the_adapter_path_only_with_a_key(method):
  """`peft.with_dropout_rng` gives both nodes per-layer keys; without a key (eval) the output is exact."""
  w = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6, 5)), jnp.float32)
  node = peft.get_adapter(method)(w, peft.AdapterSpec(method, rank=2, dropout=0.5), jax.random.PRNGKey(0), "k")
  node = node.replace(b=node.b + 1.0, **({"r": node.r + 1.0} if method == "lorasb" else {}))
  keyed = peft.with_dropout_rng({"k": node}, jax.random.PRNGKey(3))["k"]
  assert keyed.rng.shape[:1] == (2,)
  x = jnp.ones((3, 6), jnp.float32)
  one = lambda n: jax.tree.map(lambda z: z[0], n)
  full = np.asarray(one(node).dot(x))
  np.testing.assert_allclose(full, np.asarray(x @ one(node).materialize()), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(one(keyed).dot(x)), full)


def test_lorasb_trainable_count(tiny_params):
  """r^2 per adapted matrix (LoRA-XS / LoRA-SB: only R trains)."""
  adapted = peft.apply(tiny_params, {("q_proj", "down_proj"): peft.AdapterSpec("lorasb", rank=5)})
  trainable, _ = peft.split(adapted)
  assert peft.count(trainable) == _count_want(tiny_params, PATHS, lambda i, o: 25)


# =====================================================================================================
# SpIEL
# =====================================================================================================
def test_spiel_prune_regrow_by_hand():
  """k = 6 pairs in a 5 x 4 matrix, n = 3 replaced. Outgoing: the 3 smallest |delta| (positions 7, 2, 11).
  Candidates by |accumulated gradient|: 4 (current and remaining: invalid), 2 (outgoing, grown back: keeps
  its slot and delta), 19, 0, 13. Incoming: the top 3 valid (2, 19, 0); 2 is outgoing, so 19 and 0 enter,
  taking the slots of 7 and 11 (smallest |delta| first, best candidate first)."""
  idx = jnp.asarray([4, 7, 2, 11, 15, 9], jnp.int32)
  delta = jnp.asarray([0.9, 0.01, -0.02, 0.05, -0.8, 0.3])
  cand = jnp.asarray([13, 4, 2, 19, 0, 6], jnp.int32)
  score = jnp.asarray([0.1, -5.0, 4.0, -3.0, 2.0, 0.05])
  new_idx, changed, src = _spiel.prune_regrow(idx, delta, cand, score, jnp.asarray(3), 20)
  np.testing.assert_array_equal(np.asarray(new_idx), [4, 19, 2, 0, 15, 9])
  np.testing.assert_array_equal(np.asarray(changed), [False, True, False, True, False, False])
  assert int(src[1]) == 3 and int(src[3]) == 4                    # 19 and 0's candidate slots
  # Fewer valid candidates than n: only as many pairs change as enter.
  score2 = jnp.asarray([-jnp.inf, 9.0, -jnp.inf, 1.0, -jnp.inf, -jnp.inf])
  new_idx, changed, _ = _spiel.prune_regrow(idx, delta, cand, score2, jnp.asarray(3), 20)
  np.testing.assert_array_equal(np.asarray(new_idx), [4, 19, 2, 11, 15, 9])
  assert int(changed.sum()) == 1


# A float64 re-implementation of the reference (SftSelector.step / select_rigl / select_sm3, SftAdamW) for one
# matrix, from given initial indices.
class _RefSpiel:
  def __init__(self, w0, idx, R, A, T, rate, b1, b2, eps, lr, wd, regrow):
    self.w0, self.idx = _np(w0).ravel(), np.asarray(idx).copy()
    k = len(idx)
    self.vals, self.m, self.v, self.age = np.zeros(k), np.zeros(k), np.zeros(k), np.ones(k)
    self.R, self.A, self.T, self.rate = R, A, T, rate
    self.b1, self.b2, self.eps, self.lr, self.wd, self.regrow = b1, b2, eps, lr, wd, regrow
    self.c, self.scores = 0, None
    self.shape = w0.shape
    self.row, self.col = np.zeros(w0.shape[0]), np.zeros(w0.shape[1])
    self.phase = regrow == "gradient"            # begin_selection_phase at construction

  def weight(self):
    w = self.w0.copy()
    w[self.idx] += self.vals
    return w.reshape(self.shape)

  def step(self, g):
    g = _np(g)
    if self.phase:                                # the gradient hook
      gf = g.ravel()
      if self.scores is None:
        ci = np.argsort(-np.abs(gf), kind="stable")[:len(self.idx)]
        self.scores = [ci, gf[ci].copy(), gf[ci] ** 2, 1]
      else:
        ci = self.scores[0]
        self.scores[1] += gf[ci]
        self.scores[2] += gf[ci] ** 2
        self.scores[3] += 1
    if self.regrow == "momentum":
      nu = np.minimum(self.row[:, None], self.col[None, :]) + g ** 2
      self.row, self.col = nu.max(1), nu.max(0)
    gs = g.ravel()[self.idx]                      # SftAdamW.step
    self.m = self.b1 * self.m + (1 - self.b1) * gs
    self.v = self.b2 * self.v + (1 - self.b2) * gs ** 2
    denom = (np.sqrt(self.v) + self.eps) * (1 - self.b1 ** self.age) / np.sqrt(1 - self.b2 ** self.age)
    self.vals = self.vals - self.lr * self.m / denom
    self.vals = self.vals * (1 - self.lr * self.wd)
    self.age = self.age + 1
    self.c += 1                                   # SftSelector.step
    if (self.c + 1) % self.R == 0 and self.regrow == "gradient":
      self.phase, self.scores = True, None
    if self.c % self.R == self.A:
      self.phase = False
      if self.c <= self.T:
        p = 1.0 if self.c == self.A else self.rate * (1 - self.c / self.T)
        self.select(int(len(self.vals) * p))
      self.scores = None

  def select(self, n):
    changing = np.argsort(np.abs(self.vals), kind="stable")[:n]
    outgoing = self.idx[changing]
    if self.regrow == "gradient":
      remaining = set(self.idx.tolist()) - set(outgoing.tolist())
      ci, cg, cg2, samples = self.scores
      ok = np.array([c not in remaining for c in ci])
      ci, cg, cg2 = ci[ok], cg[ok], cg2[ok]
      best = np.argsort(-np.abs(cg), kind="stable")[:min(n, len(ci))]
      inc, inc_g, inc_g2 = ci[best], cg[best], cg2[best]
      changing = changing[~np.isin(outgoing, inc)]
      keep = ~np.isin(inc, outgoing)
      inc, inc_g, inc_g2 = inc[keep], inc_g[keep], inc_g2[keep]
      changing = changing[:len(inc)]
      self.m[changing] = inc_g / samples * (1 - self.b1 ** samples)
      self.v[changing] = inc_g2 / samples * (1 - self.b2 ** samples)
      self.age[changing] = samples
    else:
      est = np.outer(self.row, self.col).ravel()
      est[self.idx] = -np.inf
      inc = np.argsort(-est, kind="stable")[:n]
      self.m[changing], self.v[changing], self.age[changing] = 0.0, 0.0, 1.0
    self.idx[changing] = inc
    self.vals[changing] = 0.0


SP = dict(R=5, A=2, T=16, rate=0.5, b1=0.9, b2=0.999, eps=1e-8, lr=0.05, wd=0.1)


@pytest.mark.parametrize("regrow", ["gradient", "momentum"])
def test_spiel_matches_reference_rules_and_never_recompiles(regrow):
  """18 steps on a stacked [2, 6, 8] kernel at density 0.25 (k = 12 per layer): after every step the weights
  and the index sets equal the float64 re-implementation of the reference (selections after steps 2 (all
  pairs), 7 (n = floor(12 * 0.5 (1 - 7/16)) = 3) and 12 (n = 1); none after 17 > T = 16); the count stays k, each new entry's delta is 0 right after it
  enters, nothing outside the index set moves, and the jitted update compiles once."""
  rng = np.random.default_rng(11)
  w0 = rng.normal(size=(2, 6, 8)).astype(np.float32)
  params = {"kernel": jnp.asarray(w0)}
  tx = optim.spiel(SP["lr"], density=0.25, reselection_steps=SP["R"], selection_accumulation_steps=SP["A"],
                   initial_reselection_rate=SP["rate"], total_steps=SP["T"], regrow=regrow, b1=SP["b1"],
                   b2=SP["b2"], eps=SP["eps"], weight_decay=SP["wd"], seed=3)
  state = tx.init(params)
  idx0 = np.asarray(state.idx["kernel"])
  assert idx0.shape == (2, 12)
  refs = [_RefSpiel(w0[l], idx0[l], SP["R"], SP["A"], SP["T"], SP["rate"], SP["b1"], SP["b2"], SP["eps"],
                    SP["lr"], SP["wd"], regrow) for l in range(2)]
  update = jax.jit(tx.update)
  changes = []
  for t in range(18):
    g = rng.normal(size=w0.shape).astype(np.float32)
    before = np.asarray(state.idx["kernel"]).copy()
    u, state = update({"kernel": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, u)
    for l in range(2):
      refs[l].step(g[l])
      idx = np.asarray(state.idx["kernel"][l])
      np.testing.assert_array_equal(np.sort(idx), np.sort(refs[l].idx), err_msg=f"step {t} layer {l}")
      np.testing.assert_allclose(_np(params["kernel"][l]), refs[l].weight(), rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {t} layer {l}")
      assert len(set(idx.tolist())) == 12
      entered = np.setdiff1d(idx, before[l])
      np.testing.assert_array_equal(_np(params["kernel"][l]).ravel()[entered], _np(w0[l]).ravel()[entered])
      outside = np.setdiff1d(np.arange(48), idx)
      np.testing.assert_allclose(_np(params["kernel"][l]).ravel()[outside], _np(w0[l]).ravel()[outside], atol=1e-6)
      changes.append((t, l, len(entered)))
  n_changed = {t: sum(c for tt, _, c in changes if tt == t) for t in range(18)}
  assert n_changed[1] > 12 and 0 < n_changed[6] <= 6 and 0 < n_changed[11] <= 2   # after steps 2, 7, 12
  assert all(v == 0 for t, v in n_changed.items() if t not in (1, 6, 11))
  assert update._cache_size() == 1


def test_spiel_reselection_rate_schedules():
  """linear: 1 at the first selection (c = A), then rho_0 (1 - c/T); cosine: rho_0 (1 + cos(pi c/T)) / 2;
  no T: rho_0 (and 1 first under linear)."""
  for c in (2, 7, 12, 20):
    lin = float(_spiel.reselection_rate(c, 0.3, 2, 20, "linear"))
    cos = float(_spiel.reselection_rate(c, 0.3, 2, 20, "cosine"))
    np.testing.assert_allclose(lin, 1.0 if c == 2 else 0.3 * (1 - c / 20), rtol=1e-6)
    np.testing.assert_allclose(cos, 0.3 * (1 + math.cos(math.pi * c / 20)) / 2, rtol=1e-6, atol=1e-7)
    assert float(_spiel.reselection_rate(c, 0.3, 2, None, "linear")) == pytest.approx(1.0 if c == 2 else 0.3)


def test_spiel_trainable_count_and_state(tiny_params):
  """k = floor(density in out) pairs per matrix (the paper's density x parameters); per pair the state holds
  index, anchor, age, m, v and the phase's candidate, sum and square sum; other leaves get dense Adam."""
  kernels = lambda p: peft.map_with_path(lambda path, x: path in PATHS, p)
  state = optim.spiel(1e-3, density=0.02, total_steps=10, mask=kernels).init(tiny_params)
  flat = peft.flatten(state.idx)
  assert sum(int(x.size) for x in flat.values()) == _count_want(
      tiny_params, PATHS, lambda i, o: int(0.02 * i * o))
  for f in ("anchor", "age", "mu", "nu", "cand", "cand_g", "cand_g2"):
    assert peft.flatten(getattr(state, f))["layers/attn/q_proj/kernel"].shape == flat["layers/attn/q_proj/kernel"].shape
  assert peft.flatten(state.mu)["embed/embedding"].shape == peft.flatten(tiny_params)["embed/embedding"].shape


def test_spiel_bad_arguments_raise():
  with pytest.raises(ValueError, match="total_steps"):
    optim.spiel(1e-3, total_steps=0)
  with pytest.raises(ValueError, match="regrow"):
    optim.spiel(1e-3, total_steps=5, regrow="random")
  with pytest.raises(ValueError, match="needs params"):
    tx = optim.spiel(1e-3, total_steps=5)
    p = {"kernel": jnp.ones((4, 4))}
    tx.update(p, tx.init(p))


# =====================================================================================================
# The trainer, through each method's config switch
# =====================================================================================================
def _smoke(c):
  c.eval_before = False
  c.eval.num_examples = 0
  c.eval.num_loss_batches = 0
  return c


@pytest.mark.slow
def test_trainer_lorasb(tmp_path):
  """configs/lora.py:adapter=lorasb,init=lorasb: the data_init hook sets A, R, B from the calibration
  gradient before step 0 (A, B are frozen and checkpointed; only R trains)."""
  import train_lib   # pylint: disable=g-import-not-at-top
  from configs import lora   # pylint: disable=g-import-not-at-top
  c = _smoke(lora.get_config("model=tiny,smoke,adapter=lorasb,init=lorasb"))
  c.peft.data_init.batches = 2
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  node = summary["frozen"]["layers"]["attn"]["q_proj"]["kernel"]
  a = np.asarray(node.a[0])
  np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-4)   # orthonormal: the gradient's U_r
  r = np.asarray(summary["state"].params["layers"]["attn"]["q_proj"]["kernel"].r)
  assert np.all(np.isfinite(r)) and np.abs(r).max() > 0


@pytest.mark.slow
def test_trainer_kasa(tmp_path):
  """configs/lora.py:adapter=kasa: the regulariser reaches the loss (logged as adapter_regularizer)."""
  import json   # pylint: disable=g-import-not-at-top
  import os   # pylint: disable=g-import-not-at-top
  import train_lib   # pylint: disable=g-import-not-at-top
  from configs import lora   # pylint: disable=g-import-not-at-top
  c = _smoke(lora.get_config("model=tiny,smoke,adapter=kasa"))
  train_lib.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    logged = [json.loads(l) for l in f]
  assert any(m.get("adapter_regularizer", 0) > 0 for m in logged)


@pytest.mark.slow
@pytest.mark.parametrize("regrow", ["gradient", "momentum"])
def test_trainer_spiel(tmp_path, regrow):
  """configs/spiel.py smoke (8 steps, selections after steps 2 and 6): trains k = density in out entries per
  kernel and nothing else. (The base rebuilt here differs from the run's initial weights by float rounding
  at some entries, so "moved" means by more than 1e-6; an Adam step at lr 3e-3 moves an entry far more.)"""
  import train_lib   # pylint: disable=g-import-not-at-top
  from configs import spiel   # pylint: disable=g-import-not-at-top
  c = _smoke(spiel.get_config(f"model=tiny,smoke,density=0.05,regrow={regrow}"))
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  import data  # pylint: disable=g-import-not-at-top
  _, base = train_lib.build.build_model(c, data.get_tokenizer(c.data))
  after, before = peft.flatten(summary["state"].params), peft.flatten(base)
  q = "layers/attn/q_proj/kernel"
  L, i, o = before[q].shape
  moved = np.sum(np.abs(np.asarray(after[q]) - np.asarray(before[q])) > 1e-6, axis=(1, 2))
  assert np.all(moved <= int(0.05 * i * o)) and np.all(moved > int(0.05 * i * o) // 2)
  np.testing.assert_allclose(np.asarray(after["embed/embedding"]), np.asarray(before["embed/embedding"]), atol=1e-6)
