"""The data-driven inits that HF PEFT 0.21.2 also has: CorDA (peft/_corda.py, both modes), LoftQ
(peft/_loftq.py) and LoRA-GA (peft/_loraga.py), against PEFT on the same weights and calibration batches
(tests/ref/peft_data_init.py, one reference run), against float64 evaluations of their formulas, the output
at init, and their exports loaded by PEFT on the transformers model.

Singular vectors have arbitrary signs: CorDA and LoftQ pair the same component in A and B, so each
component's product a_i b_i is compared; LoRA-GA pairs component i in A with r + i in B, so its factors are
compared after aligning signs to PEFT's, and its residual base after undoing the sign difference.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import peft
from peft import _corda, _loftq, _loraga
from tests import refenv

R, ALPHA = 3, 6.0            # s = 2: a scale that a misplaced s would show
IN, H, OUT = 16, 12, 10
N, B, T = 3, 2, 8
VOCAB = 97
TOKENS = np.random.RandomState(1).randint(0, VOCAB, (2, 12)).astype(np.int32)
LOFTQ = [{"bits": 4, "r": 3, "iter": 1}, {"bits": 4, "r": 2, "iter": 3}, {"bits": 8, "r": 3, "iter": 2}]
REL = 1e-5


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _chain_arrays():
  rng = np.random.default_rng(0)
  arrays = {"w1": rng.normal(size=(H, IN)), "w2": rng.normal(size=(OUT, H)) / 2,
            # correlated, uneven inputs so that C is far from a multiple of I
            "x": rng.normal(size=(N, B, T, IN)) @ (np.eye(IN) + 0.1 * rng.normal(size=(IN, IN))),
            "y": rng.normal(size=(N, B, T, OUT))}
  for k in range(len(LOFTQ)):
    arrays[f"lw{k}"] = rng.normal(size=(12, 20)) * np.geomspace(1, 0.2, 20)
  return {k: v.astype(np.float32) for k, v in arrays.items()}


def _chain_params(arrays):
  params = {"l1": {"kernel": jnp.asarray(arrays["w1"].T)}, "l2": {"kernel": jnp.asarray(arrays["w2"].T)}}
  return peft.apply(params, {("l1/kernel", "l2/kernel"): peft.AdapterSpec("lora", rank=R, alpha=ALPHA)})


def _forward(p, b):
  return peft.dot(jnp.tanh(peft.dot(b["x"], p["l1"]["kernel"])), p["l2"]["kernel"])


def _loss(p, b):
  return jnp.mean((_forward(p, b) - b["y"]) ** 2)


def _batches(arrays, mask=None):
  mask = np.ones((B, T), bool) if mask is None else mask
  return [{"x": arrays["x"][i], "y": arrays["y"][i], "eva_mask": mask} for i in range(N)]


def _torch_layout(node):
  """(lora_A [r, in], lora_B [out, r], base [out, in]) of one of our nodes."""
  return (np.asarray(node.a).T, np.asarray(node.b).T,
          np.asarray(peft.float_weight(node.base, jnp.float32)).T)


def _components(a, b):
  """[r, out, in]: b[:, i] a[i] per component (sign-invariant), from PEFT-layout factors."""
  return np.einsum("oi,ij->ioj", b, a)


def _perturbed(params, seed):
  rng = np.random.RandomState(seed)
  def move(node):
    if not peft.is_adapter(node) or isinstance(node, peft.QuantizedWeight):
      return node
    return node.replace(a=node.a + 0.1 * rng.normal(size=node.a.shape).astype(np.float32),
                        b=node.b + 0.1 * rng.normal(size=node.b.shape).astype(np.float32))
  return jax.tree.map(move, params, is_leaf=peft.is_adapter)


@pytest.fixture(scope="module")
def tiny():
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=VOCAB))
  return model, jax.jit(model.init)(jax.random.PRNGKey(0))


def _tiny_calibration(model):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 3, 12), 0, VOCAB)
  forward = lambda p, b: model.apply(p, b["tokens"], head=False)

  def loss(p, b):
    logits = model.apply(p, b["tokens"][:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b["tokens"][:, 1:, None], -1))

  batches = [{"tokens": t, "eva_mask": jnp.ones(t.shape, bool)} for t in tokens]
  return forward, loss, batches


@pytest.fixture(scope="module")
def tiny_inits(tiny):
  """{name: (params at init, the spec)} for the three inits on projections of the tiny decoder."""
  model, params = tiny
  forward, loss, batches = _tiny_calibration(model)
  targets = ("q_proj", "v_proj", "up_proj", "down_proj")
  out = {}
  for name, fn in (("lora_ga", lambda p: _loraga.lora_ga_init(p, loss, batches)),
                   ("corda", lambda p: _corda.corda_init(p, forward, batches, mode="kpa")),
                   ("loftq", lambda p: _loftq.loftq_init(p, num_iter=2))):
    spec = peft.AdapterSpec("lora", rank=4, alpha=8.0, init=name)
    out[name] = (fn(peft.apply(params, {targets: spec})), spec)
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny, tiny_inits):
  """PEFT's CorDA, LoRA-GA and LoftQ on the chain, and our tiny-decoder exports loaded by PEFT: one run."""
  refenv.require()
  root = tmp_path_factory.mktemp("data_init_peft")
  arrays = _chain_arrays()
  model, params = tiny
  models.save_hf(str(root / "base"), model.config, params)
  jobs, ours = [], {}
  for k, (name, (initial, spec)) in enumerate(tiny_inits.items()):
    trained = _perturbed(initial, k)
    base = root / "base"
    if name == "loftq":     # LoftQ's adapter belongs on its dequantised base
      base = root / "loftq_base"
      models.save_hf(str(base), model.config, peft.strip(trained))
      peft.export_adapter(str(root / name), trained, spec, residual_ok=True)
    else:                   # converted to a rank-2r LoRA on the original base
      peft.export_adapter(str(root / name), trained, spec, initial=initial)
    ours[name] = (trained, initial)
    jobs.append({"base": str(base), "adapter": str(root / name)})
  ref = refenv.run("peft_data_init", {**arrays, "tokens": TOKENS}, r=R, alpha=ALPHA,
                   loftq=json.dumps(LOFTQ), jobs=json.dumps(jobs))
  return arrays, ref, ours, root


# ---- CorDA -------------------------------------------------------------------------------------------
def _corda64(w, x, mask, rank, scale, mode):
  """numpy float64: (components s b_i a_i [r, out, in], residual [out, in]) for w [out, in], x [S, T, in]."""
  cov = 0
  for xs, ms in zip(x.astype(np.float64), mask):
    xs = xs[ms]
    xs = xs / abs(xs.max())
    cov = cov + xs.T @ xs
  cov = cov / len(x)
  cfix = cov + np.eye(len(cov)) * np.mean(np.diag(cov)) * 0.01
  u, s, vh = np.linalg.svd(w.astype(np.float64) @ cfix, full_matrices=False)
  v = (vh @ np.linalg.inv(cfix)).T
  sel = slice(0, rank) if mode == "ipa" else slice(len(s) - rank, len(s))
  comps = np.einsum("oi,i,ji->ioj", u[:, sel], s[sel], v[:, sel])
  return comps, w - comps.sum(0)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_formula_float64(mode):
  """Each component s b_i a_i and the residual base against numpy float64 (per-sequence normalisation by the
  largest entry, mean over sequences, damping 0.01 mean(diag C)); padded tokens, made huge, are not counted;
  the merged weight is W."""
  arrays = _chain_arrays()
  mask = np.ones((B, T), bool)
  mask[1, -3:] = False
  x = arrays["x"].copy()
  x[:, 1, -3:] = 1e3
  params = _chain_params(arrays)
  batches = [dict(b, x=x[i]) for i, b in enumerate(_batches(arrays, mask))]
  out = _corda.corda_init(params, _forward, batches, mode=mode)
  a, b, w_res = _torch_layout(out["l1"]["kernel"])
  comps, res = _corda64(arrays["w1"], x.reshape(N * B, T, IN), np.tile(mask, (N, 1)), R, ALPHA / R, mode)
  assert rel_err(ALPHA / R * _components(a, b), comps) < 2e-5
  assert rel_err(w_res, res) < 2e-5
  np.testing.assert_allclose(np.asarray(peft.merge(out)["l1"]["kernel"]), arrays["w1"].T, atol=2e-5)
  other = _corda64(arrays["w1"], x.reshape(N * B, T, IN), np.tile(mask, (N, 1)), R, ALPHA / R,
                   "kpa" if mode == "ipa" else "ipa")[0]
  assert rel_err(ALPHA / R * _components(a, b), other) > 0.1     # the modes differ


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_equals_peft(reference, mode):
  """Same chain, same calibration sequences (PEFT: one forward per sequence): each component and the residual
  base of both layers equal PEFT's (l2's inputs are tanh(x W1), computed by each side)."""
  arrays, ref, _, _ = reference
  out = _corda.corda_init(_chain_params(arrays), _forward, _batches(arrays), mode=mode)
  tag = {"ipa": "ipm", "kpa": "kpm"}[mode]
  for name in ("l1", "l2"):
    a, b, w = _torch_layout(out[name]["kernel"])
    pa, pb, pw = (ref[f"corda_{tag}_{name}_{k}"] for k in "ABW")
    assert rel_err(_components(a, b), _components(pa, pb)) < REL, name
    assert rel_err(w, pw) < REL, name


@pytest.mark.parametrize("name", ["corda", "lora_ga"])
def test_output_unchanged_at_init(tiny, tiny_inits, name):
  """On the tiny decoder (CorDA in KPA mode): logits at init equal the base model's, with s A B != 0."""
  model, params = tiny
  initial, _ = tiny_inits[name]
  assert float(jnp.abs(initial["layers"]["mlp"]["up_proj"]["kernel"].b).max()) > 0
  np.testing.assert_allclose(np.asarray(model.apply(initial, TOKENS)), np.asarray(model.apply(params, TOKENS)),
                             rtol=1e-5, atol=2e-5)


# ---- LoRA-GA -----------------------------------------------------------------------------------------
@pytest.mark.parity
def test_lora_ga_equals_peft(reference):
  """Same chain and batches: PEFT's gradient (the mean over backward calls) and its svd_lowrank, exact here
  since q = min(4r, min(in, out)) = min(in, out). Factors equal after aligning signs; residual bases equal
  once the sign difference is undone (W_res + s A B is the same W on both sides)."""
  arrays, ref, _, _ = reference
  out = _loraga.lora_ga_init(_chain_params(arrays), _loss, _batches(arrays))
  for name in ("l1", "l2"):
    a, b, w = _torch_layout(out[name]["kernel"])
    pa, pb, pw = (ref[f"loraga_{name}_{k}"] for k in "ABW")
    sa = np.sign(np.sum(a * pa, 1))[:, None]
    sb = np.sign(np.sum(b * pb, 0))[None, :]
    assert rel_err(a * sa, pa) < REL and rel_err(b * sb, pb) < REL, name
    scale = ALPHA / R
    assert rel_err(w + scale * (b @ a - (b * sb) @ (a * sa)), pw) < REL, name


# ---- LoftQ -------------------------------------------------------------------------------------------
def _bnb_layout(kind):
  """bitsandbytes' blocks (PEFT's quantiser): ours on the torch [out, in] weight (int8: one block per row)."""
  def quantize(m):
    block = 64 if kind == "nf4" else m.shape[0]
    q = peft.quantize_array(m.T, kind, block)
    return q, q.dequantize(jnp.float32).T
  return quantize


@pytest.mark.parity
@pytest.mark.parametrize("k", range(len(LOFTQ)))
def test_loftq_equals_peft(reference, k):
  """PEFT's `loftq_init` with a bitsandbytes stand-in (NF4 blocks of 64 of the [out, in] weight; int8 per
  row) against `loftq_factors` with our quantiser in that layout and s = 1 (PEFT's factors ignore s): the
  dequantised base and each component equal PEFT's. int8's residual W - deq(Q) is ~250x smaller than W, so the
  one-ulp differences of deq(Q) (bitsandbytes multiplies by the float 1/127, we divide by 127) are ~3e-5 of it:
  its components are compared at 1e-4 (measured 2.5e-5), nf4's at 1e-5."""
  arrays, ref, _, _ = reference
  case = LOFTQ[k]
  w = jnp.asarray(arrays[f"lw{k}"].T)
  a, b, q = _loftq.loftq_factors(w, case["r"], 1.0, _bnb_layout(_loftq.KIND_OF_BITS[case["bits"]]),
                                 case["iter"])
  assert rel_err(q.dequantize(jnp.float32), ref[f"loftq_{k}_Q"]) < REL     # q holds the [out, in] weight
  tol = REL if case["bits"] == 4 else 1e-4
  assert rel_err(_components(np.asarray(a).T, np.asarray(b).T),
                 _components(ref[f"loftq_{k}_A"], ref[f"loftq_{k}_B"])) < tol
  wrong = _loftq.loftq_factors(w, case["r"], 1.0, _bnb_layout(_loftq.KIND_OF_BITS[case["bits"]]),
                               case["iter"] + 1)
  assert rel_err(_components(np.asarray(wrong[0]).T, np.asarray(wrong[1]).T),
                 _components(ref[f"loftq_{k}_A"], ref[f"loftq_{k}_B"])) > 100 * tol   # iterations matter


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_formula_and_error(bits):
  """Our stored quantiser (blocks of 64 of our [in, out] layout), s = 2: one iteration equals float64 SVD_r(W - deq(quant(W))) split as S/s; the
  next iteration quantises W - s A_1 B_1; deq(Q) + s A B is closer to W than deq(quant(W)), and more so
  with more iterations; the base is stored quantised."""
  rng = np.random.default_rng(3)
  w = (rng.normal(size=(32, 24)) * np.geomspace(1, 0.1, 24)).astype(np.float32)
  spec = peft.AdapterSpec("lora", rank=4, alpha=8.0)
  scale = spec.scale
  params = peft.apply({"w": {"kernel": jnp.asarray(w)}}, {"w/kernel": spec})
  kind = _loftq.KIND_OF_BITS[bits]
  plain = np.asarray(peft.quantize_array(jnp.asarray(w), kind, 64).dequantize(jnp.float32), np.float64)
  one = _loftq.loftq_init(params, bits=bits, num_iter=1)["w"]["kernel"]
  assert isinstance(one.base, peft.QuantizedWeight) and one.base.kind == kind
  np.testing.assert_array_equal(np.asarray(one.base.dequantize(jnp.float32)), plain.astype(np.float32))
  u, s, vt = np.linalg.svd(w.astype(np.float64) - plain)
  want = np.einsum("ik,k,kj->kij", u[:, :4], s[:4], vt[:4])
  got = scale * np.einsum("ik,kj->kij", np.asarray(one.a, np.float64), np.asarray(one.b, np.float64))
  # int8's residual is near-white noise: its top singular values are 3% apart, so a float32 SVD's components
  # carry ~1e-6 / 0.03 of error (measured 1.8e-5); nf4's are further apart (measured 2.7e-6)
  assert rel_err(got, want) < (1e-5 if bits == 4 else 5e-5)
  two = _loftq.loftq_init(params, bits=bits, num_iter=2)["w"]["kernel"]
  q2 = peft.quantize_array(jnp.asarray(w) - scale * one.a @ one.b, kind, 64).dequantize(jnp.float32)
  np.testing.assert_array_equal(np.asarray(two.base.dequantize(jnp.float32)), np.asarray(q2))
  err = lambda n: np.linalg.norm(np.asarray(peft.merge({"w": {"kernel": n}})["w"]["kernel"], np.float64) - w)
  five = _loftq.loftq_init(params, bits=bits, num_iter=5)["w"]["kernel"]
  base_err = np.linalg.norm(plain - w)
  assert err(one) < 0.9 * base_err and err(five) < err(one)
  ignored = _loftq.loftq_init(params, bits=bits, num_iter=1, peft_scale=True)["w"]["kernel"]
  np.testing.assert_allclose(np.asarray(ignored.a) @ np.asarray(ignored.b),
                             scale * np.asarray(one.a) @ np.asarray(one.b), atol=1e-5)   # PEFT's L R


def test_loftq_with_config_quantize(tiny):
  """`--config.peft.quantize=nf4 --config.peft.init=loftq`: apply_config leaves LoftQ's targets float (the
  other kernels are quantised), LoftQ then quantises them from the float weight."""
  _, params = tiny
  cfg = peft.default_config()
  cfg.method, cfg.init, cfg.quantize, cfg.targets = "lora", "loftq", "nf4", "q_proj,v_proj"
  applied = peft.apply_config(params, cfg)
  attn = applied["layers"]["attn"]
  assert not isinstance(attn["q_proj"]["kernel"].base, peft.QuantizedWeight)
  assert isinstance(attn["k_proj"]["kernel"], peft.QuantizedWeight)
  out = _loftq.loftq_init(applied)
  assert isinstance(out["layers"]["attn"]["q_proj"]["kernel"].base, peft.QuantizedWeight)
  with pytest.raises(ValueError, match="already quantised"):
    _loftq.loftq_init(out)


# ---- exports -----------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name", ["lora_ga", "corda", "loftq"])
def test_export_loads_in_peft_with_our_logits(reference, tiny, name):
  """LoRA-GA and CorDA (trained away from init) exported with `initial=`: a rank-2r LoRA that PEFT runs on
  the unmodified base with our logits. LoftQ: the adapter as it is, on its dequantised base."""
  _, ref, ours, root = reference
  model, _ = tiny
  trained, _ = ours[name]
  j = ["lora_ga", "corda", "loftq"].index(name)
  logits = np.asarray(jax.jit(model.apply)(trained, TOKENS))
  assert rel_err(logits, ref[f"logits_{j}"]) < REL
  assert rel_err(np.asarray(jax.jit(model.apply)(peft.strip(trained), TOKENS)), ref[f"logits_{j}"]) > 100 * REL
  config = json.load(open(root / name / "adapter_config.json"))
  assert config["r"] == (4 if name == "loftq" else 8)


def test_exports_refuse_the_wrong_base(tiny_inits, tmp_path):
  """A residual-base init without `initial=` or `residual_ok` raises (its adapter needs W_res); LoftQ with
  `initial=` raises (no LoRA on the original W reproduces a quantised base)."""
  for name, (initial, spec) in tiny_inits.items():
    if name == "loftq":
      with pytest.raises(ValueError, match="quantised approximation"):
        peft.export_adapter(str(tmp_path / name), initial, spec, initial=initial)
    with pytest.raises(ValueError, match="residual base"):
      peft.export_adapter(str(tmp_path / name), initial, spec)


@pytest.mark.slow
@pytest.mark.parametrize("init,quantize", [("corda", None), ("loftq", None), ("loftq", "nf4")])
def test_trainer_runs_data_init(tmp_path, init, quantize):
  """`--config.peft.init=corda|loftq` through the trainer (two steps): the frozen tree the run ends with is
  the init's (CorDA's residual base, LoftQ's quantised base)."""
  import train_lib  # pylint: disable=g-import-not-at-top
  from configs import lora  # pylint: disable=g-import-not-at-top
  c = lora.get_config("model=tiny,smoke")
  c.peft.init, c.peft.data_init.batches, c.peft.quantize = init, 2, quantize
  c.eval_before, c.eval.num_examples, c.total_steps = False, 0, 2
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  frozen = summary["frozen"]["layers"]["attn"]["q_proj"]["kernel"]
  assert np.all(np.isfinite(np.asarray(summary["state"].params["layers"]["attn"]["q_proj"]["kernel"].a)))
  if init == "loftq":
    assert isinstance(frozen.base, peft.QuantizedWeight)
  else:
    import data  # pylint: disable=g-import-not-at-top
    _, base = train_lib.build.build_model(c, data.get_tokenizer(c.data))
    assert not np.allclose(np.asarray(frozen.base), np.asarray(base["layers"]["attn"]["q_proj"]["kernel"]))
