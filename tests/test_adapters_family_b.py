"""Structured and mixture adapters (FLoRA, Compacter, MoS, LoRAMoE) and the LoRA optimizers (LoRA+, LoRA-FA).

Adapters: each forward against a float64 numpy evaluation of its paper's formula on one stacked matrix, the
merge equal to the unmerged forward, the trainable-parameter count equal to the paper's formula.
LoRAMoE: the localized balancing loss against its formula, and that it reaches the gradient through the
general auxiliary-loss mechanism (`peft.sow` -> the decoder's scan -> `losses.add_aux_losses`).
Optimizers: one step of PEFT 0.21's `create_loraplus_optimizer` (AdamW groups) and two of
`create_lorafa_optimizer` (reference environment, one subprocess for the file).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
import optim
import peft
from tests import refenv

LR, RATIO, LR_EMB, WD, FA_STEPS = 1e-2, 16.0, 1e-3, 0.1, 2


# ===========================================================================================================
# LoRA+ / LoRA-FA against PEFT
# ===========================================================================================================
@pytest.fixture(scope="module")
def peft_steps():
  refenv.require()
  return refenv.run("peft_optimizers", lr=LR, ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD, steps=FA_STEPS)


def _optim_cfg(name, **options):
  c = optim.default_config()
  c.name, c.learning_rate, c.warmup_steps, c.schedule, c.grad_clip_norm = name, LR, 0, "constant", 0.0
  c[name].update(options)
  return c


def _lora(a, b, scale=1.0):
  return peft.LoRA(None, jnp.asarray(a), jnp.asarray(b), scale=scale)


def test_loraplus_groups():
  tree = {"embed": {"embedding": _lora(np.ones((10, 2)), np.ones((2, 6)))},
          "layers": {"q": {"kernel": _lora(np.ones((3, 6, 2)), np.ones((3, 2, 5))), "bias": np.ones((3, 5))}},
          "lm_head": {"kernel": np.ones((6, 4))}}
  labels = peft.flatten(optim.loraplus_labels(tree))
  assert labels == {"embed/embedding/a": "embedding", "embed/embedding/b": "embedding",
                    "layers/q/kernel/a": "a", "layers/q/kernel/b": "b", "layers/q/bias": "b",
                    "lm_head/kernel": "a"}


def test_lorafa_projection_formula():
  # Adam hides a constant factor of the projected gradient (up to eps), so check 1/s^2 (a^T a + d I)^-1 g_b
  # directly, on stacked factors.
  rng = np.random.default_rng(0)
  a, b, ga, gb = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 3), (2, 3, 5), (2, 6, 3), (2, 3, 5)))
  out = optim.lorafa_gradients({"k": _lora(ga, gb, 2.0)}, {"k": _lora(a, b, 2.0)}, delta=1e-8)["k"]
  a64 = a.astype(np.float64)
  want = np.linalg.solve(np.swapaxes(a64, -1, -2) @ a64 + 1e-8 * np.eye(3), gb) / 4.0
  np.testing.assert_allclose(out.b, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out.a, 0.0)


@pytest.mark.parity
def test_loraplus_matches_peft(peft_steps):
  r = {k[len("plus_"):]: v for k, v in peft_steps.items() if k.startswith("plus_")}
  # torch layout -> ours: lora_A [r, in] = a^T, lora_B [out, r] = b^T (the element-wise step does not care).
  tree = lambda s: {"embed": {"embedding": _lora(r[f"emb_A_{s}"].T, r[f"emb_B_{s}"].T)},
                    "proj": {"kernel": _lora(r[f"proj_A_{s}"].T, r[f"proj_B_{s}"].T),
                             "bias": jnp.asarray(r[f"proj_bias_{s}"])}}
  params, grads = tree("w0"), tree("g")
  tx, _ = optim.make(_optim_cfg("loraplus", lr_ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD), params, 10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = peft.flatten(jax.tree.map(lambda p, u: p + u, params, updates))
  want = peft.flatten(tree("w1"))
  old = peft.flatten(params)
  for k in want:
    # Steps of 1e-3..0.16 on weights of |w| < 4: atol is one float32 ulp of torch's w + u; rtol covers
    # optax's float32 bias correction 1 - 0.999^t (torch takes it in double: 6e-6 apart at t = 1).
    np.testing.assert_allclose(new[k] - old[k], want[k] - old[k], rtol=1e-5, atol=2.5e-7, err_msg=k)


@pytest.mark.parity
def test_lorafa_matches_peft(peft_steps):
  r = peft_steps
  params = {"proj": {"kernel": _lora(r["fa_A"].T, r["fa_B0"].T, scale=4 / 2)}}
  tx, _ = optim.make(_optim_cfg("lorafa", weight_decay=WD), params, 10)
  state = tx.init(params)
  assert not any(x.shape == params["proj"]["kernel"].a.shape for x in jax.tree.leaves(state)), "A has state"
  step = jax.jit(tx.update)
  for t in range(FA_STEPS):
    # A's gradient is non-zero here: LoRA-FA must ignore it (PEFT's A has none).
    grads = {"proj": {"kernel": _lora(np.full(r["fa_A"].T.shape, 0.3, np.float32), r[f"fa_g{t}"].T, 2.0)}}
    updates, state = step(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  node = params["proj"]["kernel"]
  np.testing.assert_array_equal(node.a, r["fa_A"].T)
  b0 = r["fa_B0"].T
  np.testing.assert_allclose(np.asarray(node.b) - b0, r["fa_B"].T - b0, rtol=1e-5, atol=1e-7)


# ===========================================================================================================
# Adapters: helpers
# ===========================================================================================================
L, DIN, DOUT, N, T = 2, 6, 5, 3, 4


def _base_and_x(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((L, DIN, DOUT)).astype(np.float32),
          rng.standard_normal((N, T, DIN)).astype(np.float32))


def _randomize(node, names, seed=1):
  """The node with its trainable `names` drawn at random (the inits zero some of them: no-op adapters)."""
  rng = np.random.default_rng(seed)
  return node.replace(**{k: jnp.asarray(rng.standard_normal(getattr(node, k).shape).astype(np.float32) * 0.5)
                         for k in names})


def _layer(node, l):
  return jax.tree.map(lambda z: z[l], node)


def _forward_per_layer(node, x):
  return np.stack([np.asarray(_layer(node, l).dot(jnp.asarray(x))) for l in range(L)])


def _trainable_count(node):
  return peft.count(peft.split({"k": node})[0])


# ===========================================================================================================
# LoRAMoE
# ===========================================================================================================
def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _loramoe(e=4, r=2, alpha=4.0, delta=0.1):
  w, x = _base_and_x()
  spec = peft.AdapterSpec("loramoe", rank=r, alpha=alpha, options={"num_experts": e, "blc_alpha": delta})
  node = peft.get_adapter("loramoe")(jnp.asarray(w), spec, jax.random.PRNGKey(0), "layers/mlp/up_proj/kernel")
  return _randomize(node, ("router", "a", "b")), w, x


def test_loramoe_forward_formula():
  node, w, x = _loramoe()
  got = _forward_per_layer(node, x)
  for l in range(L):
    wr, a, b = (np.asarray(getattr(node, k)[l], np.float64) for k in ("router", "a", "b"))
    om = _softmax(x.astype(np.float64) @ wr)                                     # [N, T, E]
    want = x @ w[l].astype(np.float64) + node.scale * sum(
        om[..., e:e + 1] * (x @ a[e] @ b[e]) for e in range(a.shape[0]))
    np.testing.assert_allclose(got[l], want, rtol=1e-5, atol=1e-5)


def test_loramoe_trainable_count():
  e, r = 4, 2
  node, _, _ = _loramoe(e=e, r=r)
  assert _trainable_count(node) == L * (DIN * e + e * r * (DIN + DOUT))   # router + E LoRA pairs, per layer


def test_loramoe_balancing_loss_formula():
  node, _, x = _loramoe(delta=0.1)
  one = _layer(node, 0)
  types = np.array([1, 0, 1])
  with losses.collecting() as sown:
    one.dot(jnp.asarray(x))
  _, metrics = losses.add_aux_losses(jnp.zeros(()), {}, sown, {"task_types": jnp.asarray(types)}, None)
  om = _softmax(x.astype(np.float64) @ np.asarray(one.router, np.float64))
  q = om.sum(1)                                                                 # [N, E]
  e = q.shape[1]
  mine = np.arange(e) < e // 2                                                  # the task half
  coef = np.where((types[:, None] == 1) == mine[None, :], 1.1, 0.9)
  z = (q * coef).ravel()
  want = z.var(ddof=1) / (z.mean() ** 2 + 1e-10)
  np.testing.assert_allclose(float(metrics["aux/loramoe_blc"]), want, rtol=1e-5)


def test_loramoe_balancing_loss_reaches_the_gradient(tiny_model):
  from train_lib import train  # pylint: disable=g-import-not-at-top
  model, params = tiny_model()
  spec = peft.AdapterSpec("loramoe", rank=2, alpha=4.0, options={"num_experts": 4})
  params = peft.apply(params, {("gate_proj", "up_proj", "down_proj"): spec}, jax.random.PRNGKey(1))
  trainable, frozen = peft.split(params)
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(1, model.config.vocab_size, (2, 1, 8)), jnp.int32)
  batch = {"inputs": toks, "targets": jnp.roll(toks, -1, -1), "loss_mask": jnp.ones(toks.shape, jnp.float32),
           "task_types": jnp.asarray([1, 0])}

  def run(weight):
    cfg = ml_collections.ConfigDict({"name": "nll", "z_loss": 0.0, "aux_weights": {"loramoe_blc": weight}})
    fn = lambda t: train.loss_and_metrics(t, frozen, None, batch, None, model=model,
                                          loss_entry=losses.get("nll"), loss_cfg=cfg)
    return jax.value_and_grad(fn, has_aux=True)

  ((loss0, m0), g0), ((loss1, m1), g1) = jax.jit(lambda t: (run(0.0)(t), run(1.0)(t)))(trainable)
  term = float(m1["aux/loramoe_blc"])
  assert term > 0 and float(m0["aux/loramoe_blc"]) == pytest.approx(term)
  np.testing.assert_allclose(float(loss1) - float(loss0), term, rtol=1e-5)
  # The term comes from the routers of every FFN module of both layers (sown through the layer scan), and
  # its gradient is what the weight adds to theirs.
  gr = lambda g, m: np.asarray(g["layers"]["mlp"][m]["kernel"].router)
  for m in ("gate_proj", "up_proj", "down_proj"):
    assert np.abs(gr(g1, m) - gr(g0, m)).max() > 1e-6, m


# ===========================================================================================================
# FLoRA
# ===========================================================================================================
def _make(method, w, rank=2, **options):
  spec = peft.AdapterSpec(method, rank=rank, options=options)
  return peft.get_adapter(method)(jnp.asarray(w), spec, jax.random.PRNGKey(0), "layers/mlp/down_proj/kernel")


def test_flora_forward_formula_and_merge():
  w, x = _base_and_x()
  node = _make("flora", w, ranks=(2, 3), scale=4.0)
  np.testing.assert_allclose(_forward_per_layer(node, x), np.einsum("nti,lio->lnto", x, w), rtol=1e-6)  # G = 0
  node = _randomize(node, ("u1", "core", "u2"))
  got = _forward_per_layer(node, x)
  u1, g, u2 = (np.asarray(getattr(node, k), np.float64) for k in ("u1", "core", "u2"))
  for l in range(L):
    want = x @ w[l].astype(np.float64) + 4.0 * (x @ u1[l] @ g[l] @ u2[l].T)   # s U1 G U2^T
    np.testing.assert_allclose(got[l], want, rtol=1e-5, atol=1e-5)
  merged = np.asarray(node.materialize())
  np.testing.assert_allclose(np.einsum("nti,lio->lnto", x, merged), got, rtol=1e-5, atol=1e-5)


def test_flora_trainable_count():
  w, _ = _base_and_x()
  assert _trainable_count(_make("flora", w, ranks=(2, 3))) == L * (DIN * 2 + 2 * 3 + DOUT * 3)


# ===========================================================================================================
# Compacter
# ===========================================================================================================
def _gelu_tanh(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _compacter(n=2, red=2, din=6, d=8):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((L, din, d)).astype(np.float32)
  node = _make("compacter", w, n=n, reduction_factor=red)
  names = ("rule", "down_s", "down_t", "down_bias", "up_s", "up_t", "up_bias")
  return _randomize(node, names), w, rng.standard_normal((N, T, din)).astype(np.float32)


def test_compacter_forward_formula():
  node, w, x = _compacter()
  sliced, closed = node.scan_parts()
  assert sliced.rule is None and closed.shape == (2, 2, 2)     # the slow weights carry no layer axis
  f64 = lambda z: np.asarray(z, np.float64)
  rule = f64(node.rule)

  def phm(s, t):   # sum_i A_i kron (s_i t_i^T)
    return sum(np.kron(rule[i], s[i] @ t[i]) for i in range(rule.shape[0]))

  for l in range(L):
    layer = jax.tree.map(lambda z: z[l], sliced).scan_bind(node.rule)
    got = np.asarray(layer.dot(jnp.asarray(x)))
    p = {k: f64(getattr(node, k)[l]) for k in ("down_s", "down_t", "down_bias", "up_s", "up_t", "up_bias")}
    h = x @ w[l].astype(np.float64)
    want = h + _gelu_tanh(h @ phm(p["down_s"], p["down_t"]) + p["down_bias"]) @ phm(p["up_s"], p["up_t"]) \
        + p["up_bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_compacter_trainable_count():
  n, red, d = 2, 2, 8
  node, _, _ = _compacter(n=n, red=red, d=d)
  k = d // red
  # shared A (n^3) + per layer: rank-1 factors of both projections, r (d + k) each, and the two biases.
  assert _trainable_count(node) == n ** 3 + L * (2 * (d + k) + k + d)
  w, _ = _base_and_x()
  with pytest.raises(ValueError, match="divisible"):
    _make("compacter", w)          # DOUT=5 is no multiple of n=4


# ===========================================================================================================
# MoS
# ===========================================================================================================
def _mos(rank=4, l=2, **options):
  w, x = _base_and_x()
  node = _make("mos", w, rank=rank, shards_per_vector=l, **options)
  return _randomize(node, ("pool_a", "pool_b")), w, x


def test_mos_forward_formula_and_merge():
  r, l = 4, 2
  node, w, x = _mos(r, l)
  sliced, (pa, pb) = node.scan_parts()
  pa, pb = np.asarray(pa, np.float64), np.asarray(pb, np.float64)
  got = []
  for i in range(L):
    layer = jax.tree.map(lambda z: z[i], sliced).scan_bind((node.pool_a, node.pool_b))
    got.append(np.asarray(layer.dot(jnp.asarray(x))))
    ia, ib = np.asarray(node.idx_a[i]), np.asarray(node.idx_b[i])
    # rank vector j = its l shards concatenated, cut to the width (DIN = 6 -> shards of 3; DOUT = 5 -> of 3)
    a = np.stack([np.concatenate([pa[ia[j, m]] for m in range(l)])[:DIN] for j in range(r)], 1)   # [in, r]
    b = np.stack([np.concatenate([pb[ib[j, m]] for m in range(l)])[:DOUT] for j in range(r)], 0)  # [r, out]
    want = x @ w[i].astype(np.float64) + node.scale * (x @ a @ b)
    np.testing.assert_allclose(got[-1], want, rtol=1e-5, atol=1e-5)
  merged = np.asarray(node.materialize())
  np.testing.assert_allclose(np.einsum("nti,lio->lnto", x, merged), np.stack(got), rtol=1e-5, atol=1e-5)


def test_mos_index_scheme_and_trainable_count():
  r, l, private, public = 4, 2, 2, 7
  node, _, _ = _mos(r, l, private=private, public=public)
  for idx in (np.asarray(node.idx_a), np.asarray(node.idx_b)):
    for i in range(L):
      slots = idx[i].reshape(-1)
      np.testing.assert_array_equal(slots[:private], public + i * private + np.arange(private))   # its own
      shared = slots[private:]
      assert len(set(shared)) == len(shared) and shared.max() < public        # distinct public shards
  assert not np.array_equal(node.idx_a, node.idx_b)                             # pair dissociation
  size = public + L * private
  assert _trainable_count(node) == size * (-(-DIN // l) + -(-DOUT // l))
