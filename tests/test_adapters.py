"""Adapters as parameter transforms, without the reference stack: targets and errors, the forward formulas,
what trains, dropout, inits, merges (quantised bases, config and the HF-format round trip are in
test_adapters_quant.py).

Parity with HF `peft` is in test_peft_parity.py / test_peft_export.py; the training run in
test_adapters_train.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from models import Decoder, DecoderConfig

CFG = DecoderConfig.tiny(vocab_size=50)     # D=64, L=2, H=4, KV=2 (kv width 32), F=176
MODEL = Decoder(CFG)
PARAMS = MODEL.init(jax.random.PRNGKey(0))
APPLY = jax.jit(MODEL.apply)      # one compile per tree structure
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)))


def nodes(params):
  return peft._export._adapter_nodes(params)


def with_random_b(params, seed=0):
  """Adapters moved off their no-op init so that forward formulas show."""
  rng = np.random.RandomState(seed)
  def move(n):
    if not peft.is_adapter(n) or isinstance(n, peft.QuantizedWeight):
      return n
    upd = {f: getattr(n, f) + 0.3 * jnp.asarray(rng.normal(size=getattr(n, f).shape), jnp.float32)
           for f in n.trainable_fields if getattr(n, f) is not None}   # LoRA's bias is optional
    return n.replace(**upd)
  return jax.tree.map(move, params, is_leaf=peft.is_adapter)


def rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


# ---------------------------------------------------------------------------------------------------
# Targets and errors
# ---------------------------------------------------------------------------------------------------
def test_hf_names_regexes_and_all_linear_select_kernels():
  spec = peft.AdapterSpec(rank=2)
  by_name = nodes(peft.apply(PARAMS, {("q_proj", "v_proj"): spec}))
  assert sorted(by_name) == ["layers/attn/q_proj/kernel", "layers/attn/v_proj/kernel"]
  by_rx = nodes(peft.apply(PARAMS, {r"layers/attn/(q|v)_proj/kernel": spec}))
  assert sorted(by_rx) == sorted(by_name)
  assert sorted(nodes(peft.apply(PARAMS, {"self_attn.q_proj": spec}))) == ["layers/attn/q_proj/kernel"]
  every = nodes(peft.apply(PARAMS, {"all-linear": spec}))
  assert len(every) == 7 and "lm_head/kernel" not in every          # PEFT's all-linear skips lm_head
  assert "lm_head/kernel" in nodes(peft.apply(PARAMS, {"lm_head": spec}))
  # Paths never move: the adapted tree has the plain tree's dict structure above the nodes.
  adapted = peft.apply(PARAMS, {"all-linear": spec})
  assert jax.tree.structure(peft.merge(adapted)) == jax.tree.structure(PARAMS)


def test_first_target_wins_and_config_strings_split_on_commas():
  adapted = peft.apply(PARAMS, {"q_proj": peft.AdapterSpec("dora", rank=2),
                                "all-linear": peft.AdapterSpec(rank=3)})
  kinds = {p: (type(n).__name__, n.rank) for p, n in nodes(adapted).items()}
  assert kinds["layers/attn/q_proj/kernel"] == ("DoRA", 2)
  assert kinds["layers/mlp/up_proj/kernel"] == ("LoRA", 3)
  assert sorted(nodes(peft.apply(PARAMS, {"q_proj, up_proj": peft.AdapterSpec(rank=2)}))) == [
      "layers/attn/q_proj/kernel", "layers/mlp/up_proj/kernel"]


def test_bad_target_unknown_method_and_init_fail_listing_names():
  with pytest.raises(ValueError, match=r"\['qproj'\] match no kernel.*layers/attn/q_proj/kernel.*all-linear"):
    peft.apply(PARAMS, {("qproj", "v_proj"): peft.AdapterSpec()})
  with pytest.raises(ValueError, match=r"unknown adapter method 'lorra'; valid: .*dora.*ia3.*lora"):
    peft.apply(PARAMS, {"q_proj": peft.AdapterSpec("lorra")})
  with pytest.raises(ValueError, match=r"unknown adapter init 'pisa'; valid: .*olora.*pissa"):
    peft.apply(PARAMS, {"q_proj": peft.AdapterSpec(init="pisa")})
  with pytest.raises(ValueError, match="already holds a LoRA"):
    peft.apply(peft.apply(PARAMS, {"q_proj": peft.AdapterSpec()}), {"q_proj": peft.AdapterSpec()})
  cfg = peft.default_config()
  cfg.method = "lora"
  cfg.quantize = "nf3"
  with pytest.raises(ValueError, match="quantize='nf3'; valid: None, nf4, int8"):
    peft.apply_config(PARAMS, cfg)
  cfg.method, cfg.quantize = None, "nf4"
  with pytest.raises(ValueError, match="needs an adapter method"):
    peft.apply_config(PARAMS, cfg)


# ---------------------------------------------------------------------------------------------------
# Forward formulas
# ---------------------------------------------------------------------------------------------------
def _one(method="lora", init="default", rank=3, alpha=6.0, **kw):
  w = jnp.asarray(np.random.RandomState(1).normal(size=(12, 10)), jnp.float32)
  node = peft.apply({"k": {"kernel": w}}, {"k": peft.AdapterSpec(method, rank=rank, alpha=alpha, init=init,
                                                                   **kw)})["k"]["kernel"]
  return w, with_random_b({"n": node})["n"]


def test_lora_and_rslora_forward():
  x = jnp.asarray(np.random.RandomState(2).normal(size=(4, 12)), jnp.float32)
  for rslora, scale in ((False, 6.0 / 3), (True, 6.0 / math.sqrt(3))):
    w, n = _one(use_rslora=rslora)
    assert n.scale == pytest.approx(scale)
    want = np.asarray(x) @ np.asarray(w) + scale * (np.asarray(x) @ np.asarray(n.a)) @ np.asarray(n.b)
    np.testing.assert_allclose(peft.dot(x, n), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n.materialize(), np.asarray(w) + scale * np.asarray(n.a) @ np.asarray(n.b),
                               rtol=1e-6, atol=1e-6)


def test_lora_forward_never_forms_the_merged_weight():
  """No [in, out] intermediate besides the base itself in LoRA's dot (DoRA's does need one)."""
  _, lora = _one()
  _, dora = _one("dora")
  x = jnp.ones((5, 12))
  def big_intermediates(n):
    eqns = jax.make_jaxpr(lambda n, x: peft.dot(x, n))(n, x).jaxpr.eqns
    return [e.primitive.name for e in eqns for v in e.outvars if v.aval.shape == (12, 10)]
  assert big_intermediates(lora) == []
  assert big_intermediates(dora)


def test_dora_forward_and_detached_norm():
  w, n = _one("dora")
  x = jnp.asarray(np.random.RandomState(3).normal(size=(4, 12)), jnp.float32)
  v = np.asarray(w, np.float64) + n.scale * np.asarray(n.a, np.float64) @ np.asarray(n.b, np.float64)
  col = np.linalg.norm(v, axis=0)                                   # per output unit, over `in`
  np.testing.assert_allclose(peft.dot(x, n), np.asarray(x) @ (v * (np.asarray(n.m) / col)), rtol=1e-5,
                             atol=1e-5)
  # The norm is a constant for the gradient (DoRA §4.3, PEFT's .detach()).
  loss = lambda a: jnp.sum(jnp.sin(peft.dot(x, n.replace(a=a))))
  const = jnp.asarray(col, jnp.float32)
  loss_const = lambda a: jnp.sum(jnp.sin(
      x @ ((w + n.scale * a @ n.b) * (n.m / const))))
  loss_live = lambda a: jnp.sum(jnp.sin(
      x @ ((w + n.scale * a @ n.b) * (n.m / jnp.linalg.norm(w + n.scale * a @ n.b, axis=0)))))
  g, g_const, g_live = jax.grad(loss)(n.a), jax.grad(loss_const)(n.a), jax.grad(loss_live)(n.a)
  np.testing.assert_allclose(g, g_const, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g - g_live).max()) > 1e-2 * float(jnp.abs(g).max())


def test_dora_magnitude_starts_at_the_column_norm():
  w, _ = _one("dora")
  n = peft.apply({"k": {"kernel": w}}, {"k": peft.AdapterSpec("dora", rank=3)})["k"]["kernel"]
  np.testing.assert_allclose(n.m, np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)


def test_ia3_scales_outputs_or_feedforward_inputs():
  w = jnp.asarray(np.random.RandomState(4).normal(size=(12, 10)), jnp.float32)
  x = jnp.asarray(np.random.RandomState(5).normal(size=(3, 12)), jnp.float32)
  params = {"attn": {"kernel": w}, "down_proj": {"kernel": w}}
  adapted = with_random_b(peft.apply(params, {("attn", "down_proj"): peft.AdapterSpec("ia3")}))
  out, ff = adapted["attn"]["kernel"], adapted["down_proj"]["kernel"]
  assert (out.feedforward, out.l.shape, ff.feedforward, ff.l.shape) == (False, (10,), True, (12,))
  np.testing.assert_allclose(peft.dot(x, out), (x @ w) * out.l, rtol=1e-5)
  np.testing.assert_allclose(peft.dot(x, ff), (x * ff.l) @ w, rtol=1e-5)
  np.testing.assert_allclose(x @ ff.materialize(), peft.dot(x, ff), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,init", [("lora", "default"), ("lora", "pissa"), ("lora", "olora"),
                                         ("dora", "gaussian"), ("ia3", "default")])
def test_model_merge_and_strip(method, init):
  adapted = peft.apply(PARAMS, {"all-linear": peft.AdapterSpec(method, rank=4, alpha=8, init=init)},
                       jax.random.PRNGKey(1))
  base = APPLY(PARAMS, TOKENS)
  # Every init starts as the base model (PiSSA/OLoRA move W's part into the adapter, not away).
  assert rel(APPLY(adapted, TOKENS), base) < 1e-5
  trained = with_random_b(adapted)
  out = APPLY(trained, TOKENS)
  assert rel(out, base) > 1e-2
  assert rel(APPLY(peft.merge(trained), TOKENS), out) < 1e-5
  stripped = APPLY(peft.strip(trained), TOKENS)      # the reference model: the (residual) base
  if init in ("pissa", "olora"):
    assert rel(stripped, base) > 1e-2
  else:
    np.testing.assert_array_equal(stripped, base)


# ---------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,fields", [("lora", {"a", "b"}), ("dora", {"a", "b", "m"}), ("ia3", {"l"})])
def test_gradients_reach_only_adapter_params(method, fields):
  adapted = with_random_b(peft.apply(PARAMS, {("q_proj", "down_proj"): peft.AdapterSpec(method, rank=2)}))
  trainable, frozen = peft.split(adapted)
  flat_t, flat_f = peft.flatten(trainable), peft.flatten(frozen)
  assert {p.rsplit("/", 1)[1] for p in flat_t} == fields and not set(flat_t) & set(flat_f)
  assert "layers/attn/q_proj/kernel/base" in flat_f and "embed/embedding" in flat_f
  assert peft.count(trainable) + peft.count(frozen) == peft.count(adapted)

  def loss(t):
    logits = APPLY(peft.combine(t, frozen), TOKENS)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  grads = jax.grad(loss)(trainable)
  assert set(peft.flatten(grads)) == set(flat_t)                    # the frozen tree gets no gradient
  assert all(float(jnp.abs(g).max()) > 0 for g in peft.flatten(grads).values())


def test_count_of_lora_parameters():
  trainable, _ = peft.split(peft.apply(PARAMS, {("q_proj", "v_proj"): peft.AdapterSpec(rank=4)}))
  assert peft.count(trainable) == CFG.num_layers * 4 * ((64 + 64) + (64 + 32))


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------
def test_dropout_drops_the_adapter_input_only():
  """base 0, A = B = I, s = 1: dot(x) is the dropped x, so its zeros and scale show."""
  eye = jnp.eye(64)
  node = peft.LoRA(jnp.zeros((2, 64, 64)), jnp.stack([eye, eye]), jnp.stack([eye, eye]), scale=1.0,
                   dropout=0.25)
  params = peft.with_dropout_rng({"k": {"kernel": node}}, jax.random.PRNGKey(3))
  keys = params["k"]["kernel"].rng
  assert keys.shape == (2, 2) and not np.array_equal(keys[0], keys[1])   # one key per stacked layer
  x = jnp.ones((8, 64))
  outs = [peft.dot(x, jax.tree.map(lambda z: z[i], params["k"]["kernel"])) for i in range(2)]
  for y in outs:
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.05
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert not np.array_equal(outs[0], outs[1])
  # No key (eval, the reference model): no dropout.
  np.testing.assert_allclose(peft.dot(x, jax.tree.map(lambda z: z[0], node)), x, rtol=1e-6)
  assert peft.with_dropout_rng(params, None) is params


def test_dropout_in_the_model_changes_only_the_adapter_path():
  adapted = with_random_b(peft.apply(PARAMS, {"all-linear": peft.AdapterSpec(rank=4, dropout=0.5)}))
  a = APPLY(peft.with_dropout_rng(adapted, jax.random.PRNGKey(0)), TOKENS)
  b = APPLY(peft.with_dropout_rng(adapted, jax.random.PRNGKey(1)), TOKENS)
  plain = APPLY(adapted, TOKENS)
  assert rel(a, plain) > 1e-3 and rel(a, b) > 1e-3
  np.testing.assert_array_equal(a, APPLY(peft.with_dropout_rng(adapted, jax.random.PRNGKey(0)), TOKENS))
  t, f = peft.split(adapted)           # keys live outside the trainable tree
  assert "rng" not in {p.rsplit("/", 1)[1] for p in peft.flatten(t)}


# ---------------------------------------------------------------------------------------------------
# Inits
# ---------------------------------------------------------------------------------------------------
def test_olora_factors_are_q_and_r_of_the_torch_weight():
  w, _ = _one()
  n = peft.apply({"k": {"kernel": w}}, {"k": peft.AdapterSpec(rank=3, alpha=6, init="olora")})["k"]["kernel"]
  b, a = np.asarray(n.b), np.asarray(n.a)
  np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)        # rows of B: orthonormal columns of Q
  assert np.allclose(np.triu(a.T, 0), a.T, atol=1e-6)             # A^T = R[:r], upper trapezoidal
  np.testing.assert_allclose(np.asarray(n.base) + 2.0 * a @ b, w, atol=1e-5)


def test_randomized_pissa_approaches_exact_pissa():
  rng = np.random.RandomState(6)
  u, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  v, _ = np.linalg.qr(rng.normal(size=(30, 30)))
  s = 0.7 ** np.arange(30)                                         # decaying spectrum, as in trained weights
  w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
  get = lambda init: peft.apply({"k": {"kernel": w}}, {"k": peft.AdapterSpec(rank=4, init=init)},
                                jax.random.PRNGKey(0))["k"]["kernel"]
  exact = get("pissa")
  low = lambda n: np.asarray(n.a) @ np.asarray(n.b)
  errs = [np.abs(low(get(f"pissa_niter_{k}")) - low(exact)).max() for k in (0, 2, 8)]
  assert errs[0] > errs[1] > errs[2] and errs[0] > 1e-3 and errs[2] < 1e-4


def test_residual_to_lora_keeps_outputs_on_the_original_base():
  initial = peft.apply(PARAMS, {"all-linear": peft.AdapterSpec(rank=4, alpha=8, init="pissa")})
  trained = with_random_b(initial)
  lora = peft.residual_to_lora(trained, initial)
  for p, n in nodes(lora).items():
    assert n.rank == 8
    np.testing.assert_allclose(n.base, peft.flatten(PARAMS)[p], atol=1e-5)
  assert rel(APPLY(lora, TOKENS), APPLY(trained, TOKENS)) < 1e-5
