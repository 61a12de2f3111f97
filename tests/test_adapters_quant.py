"""Quantised frozen bases (NF4, int8), the config section and the HF-format round trip, without the
reference stack (the rest of the adapter behaviour is in test_adapters.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm as normal

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
# Quantised bases
# ---------------------------------------------------------------------------------------------------
def test_nf4_levels_are_normal_quantiles():
  """bitsandbytes' construction: 8 positive and 7 negative N(0,1) quantiles and 0, scaled to [-1, 1]."""
  off = 0.9677083
  pos = normal.ppf(np.linspace(off, 0.5, 9)[:-1])
  neg = -normal.ppf(np.linspace(off, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([pos, [0.0], neg]))
  np.testing.assert_allclose(peft._quant.NF4_LEVELS, levels / levels.max(), atol=2e-7)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantisation_error_bounds(kind):
  w = jnp.asarray(np.random.RandomState(7).standard_t(5, size=(2, 40, 24)), jnp.float32)
  q = peft.quantize_array(w, kind, 64)
  deq = np.asarray(q.dequantize())
  blocks = np.pad(np.asarray(w).reshape(2, -1), ((0, 0), (0, 0))).reshape(2, -1, 64)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  err = np.abs(deq.reshape(2, -1, 64) - blocks)
  np.testing.assert_allclose(q.scales, absmax[..., 0], rtol=1e-6)
  if kind == "int8":
    assert np.all(err <= absmax / 254 * (1 + 1e-5))
  else:
    levels = peft._quant.NF4_LEVELS
    nearest = levels[np.abs((blocks / absmax)[..., None] - levels).argmin(-1)] * absmax
    np.testing.assert_allclose(deq.reshape(2, -1, 64), nearest, rtol=1e-6, atol=1e-7)
    assert np.all(err <= absmax * np.diff(levels).max() / 2 * (1 + 1e-5))
  assert q.codes.dtype == (jnp.uint8 if kind == "nf4" else jnp.int8)


def test_quantised_base_memory_and_qlora_forward():
  cfg = peft.default_config()
  cfg.method, cfg.targets, cfg.rank = "lora", "all-linear", 4
  float_lora = with_random_b(peft.apply_config(PARAMS, cfg, jax.random.PRNGKey(0)))
  ref = APPLY(float_lora, TOKENS)
  kernels = {p: x for p, x in peft.flatten(PARAMS).items() if p.startswith("layers/") and p.endswith("kernel")}
  float_bytes = peft.nbytes(kernels)
  for kind, ratio, tol in (("nf4", 4 / (0.5 + 4 / 64), 0.1), ("int8", 4 / (1 + 4 / 64), 0.01)):
    cfg.quantize = kind
    q = peft.apply_config(PARAMS, cfg, jax.random.PRNGKey(0))
    q = jax.tree.map(lambda n, f: n.replace(a=f.a, b=f.b) if isinstance(n, peft.LoRA) else n, q, float_lora,
                     is_leaf=lambda n: isinstance(n, peft.LoRA))
    bases = [n.base for n in nodes(q).values()]
    assert all(isinstance(b, peft.QuantizedWeight) and b.kind == kind for b in bases)
    # 2 layers x 7 kernels: storage shrinks by the bytes-per-value ratio (float32 4 B vs codes + scales).
    assert float_bytes / peft.nbytes(bases) == pytest.approx(ratio, rel=1e-3)
    trainable, frozen = peft.split(q)      # the frozen tree holds codes and scales, no float kernel
    flat = peft.flatten(frozen)
    assert not any(p.endswith("/kernel/base") for p in flat)
    assert {p for p in flat if p.endswith("/kernel/base/codes")} == {f"{p}/base/codes" for p in kernels}
    assert {p.rsplit("/", 1)[1] for p in peft.flatten(trainable)} == {"a", "b"}
    assert rel(APPLY(q, TOKENS), ref) < tol
    assert rel(APPLY(peft.merge(q), TOKENS), APPLY(q, TOKENS)) < 1e-5


def test_pissa_on_a_quantised_base_requantises_the_residual():
  cfg = peft.default_config()
  cfg.update(dict(method="lora", targets="q_proj", rank=4, init="pissa", quantize="int8"))
  q = peft.apply_config(PARAMS, cfg)
  n = q["layers"]["attn"]["q_proj"]["kernel"]
  assert isinstance(n.base, peft.QuantizedWeight)
  w = PARAMS["layers"]["attn"]["q_proj"]["kernel"]
  # W ~ Q(W_res) + s A B: int8 error of the residual only (the top components stay exact in A, B).
  assert rel(n.materialize(), w) < 0.01


# ---------------------------------------------------------------------------------------------------
# Config and HF-format round trip
# ---------------------------------------------------------------------------------------------------
def test_config_section():
  cfg = peft.default_config()
  assert cfg.method is None and peft.apply_config(PARAMS, cfg) is PARAMS
  assert peft.apply_config(PARAMS, None) is PARAMS
  assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.init, cfg.use_rslora, cfg.quantize, cfg.quant_block_size) == (
      8, 8.0, 0.0, "default", False, None, 64)
  cfg.method = "dora"
  adapted = peft.apply_config(PARAMS, cfg, jax.random.PRNGKey(0))
  assert sorted(nodes(adapted)) == ["layers/attn/q_proj/kernel", "layers/attn/v_proj/kernel"]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "lora_bias"])
def test_export_import_round_trip(tmp_path, method):
  options = {"lora_bias": True} if method == "lora_bias" else {}
  adapted = with_random_b(peft.apply(PARAMS, {("q_proj", "down_proj", "lm_head"): peft.AdapterSpec(
      method.replace("_bias", ""), rank=3, alpha=5, options=options)}))
  config = peft.export_adapter(str(tmp_path), adapted, None, "llama")
  assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
  assert config.get("lora_bias", False) == (method == "lora_bias")
  back = peft.import_adapter(str(tmp_path), peft.strip(adapted))
  for p, n in nodes(adapted).items():
    m = nodes(back)[p]
    assert type(m) is type(n) and getattr(m, "scale", None) == pytest.approx(getattr(n, "scale", None))
    for f in n.trainable_fields:
      if getattr(n, f) is None:
        assert getattr(m, f) is None
      else:
        np.testing.assert_array_equal(getattr(m, f), getattr(n, f))
  with pytest.raises(ValueError, match="adapter for lm_head/kernel, which params lack"):
    peft.import_adapter(str(tmp_path), {k: v for k, v in peft.strip(adapted).items() if k != "lm_head"})
