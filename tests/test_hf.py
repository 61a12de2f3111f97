"""Hugging Face interop: config.json dialects, checkpoint import/export, parity of logits with transformers.

The parity tests build tiny random models of each family with transformers (tests/ref/hf_make_model.py),
load them with `load_hf` and compare logits; and the other way round, write our random models with
`save_hf` and let `AutoModelForCausalLM.from_pretrained` run them (tests/ref/hf_logits.py).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import Decoder, DecoderConfig, config_from_hf, config_to_hf, load_hf, save_hf
from tests import refenv

VOCAB = 97
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12)).astype(np.int32)
# Made by tests/ref/hf_make_model.py; `_sharded` is saved in 12 shards, `_bf16` in bfloat16.
HF_MADE = ("llama", "llama_linear", "llama3", "mistral", "mistral_sw", "qwen2", "gemma", "llama_sharded",
           "llama_bf16")
REL_TOL = 1e-4

needs_ref = refenv.needs_ref


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def logits_of(cfg, params):
  return np.asarray(Decoder(cfg).apply(params, TOKENS))


def perturbed(cfg, seed):
  """Random params of our model with norm scales and biases away from their init too."""
  params = Decoder(cfg).init(jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed)
  def noisy(path, x):
    x = np.asarray(x, np.float32)
    name = jax.tree_util.keystr(path)
    scale = 0.3 if "norm" in name else 0.2 if "bias" in name else 0.0
    base = x if scale else rng.normal(0, 0.15, x.shape).astype(np.float32)
    return base + scale * rng.normal(size=x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(noisy, params)


# ---------------------------------------------------------------------------------------------------
# Import: transformers' checkpoints -> our logits
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_made(tmp_path_factory):
  refenv.require()
  root = tmp_path_factory.mktemp("hf_made")
  ref = refenv.run("hf_make_model", {"tokens": TOKENS}, root=str(root), names=",".join(HF_MADE))
  return root, ref


@pytest.mark.parity
@pytest.mark.parametrize("name", HF_MADE)
def test_load_hf_logits_match_transformers(hf_made, name):
  root, ref = hf_made
  cfg, params = load_hf(str(root / name), dtype="float32")
  assert rel_err(logits_of(cfg, params), ref[f"logits_{name}"]) <= REL_TOL


@pytest.mark.parity
def test_load_hf_reads_what_each_family_means(hf_made):
  """The switches behind the logits above, so a failure there points at its cause."""
  root, _ = hf_made
  cfgs = {n: load_hf(str(root / n))[0] for n in ("llama", "llama3", "mistral_sw", "qwen2", "gemma")}
  assert (cfgs["llama"].qkv_bias, cfgs["llama"].o_bias, cfgs["llama"].mlp_bias) == (True, True, True)
  assert (cfgs["qwen2"].qkv_bias, cfgs["qwen2"].o_bias, cfgs["qwen2"].tie_embeddings) == (True, False, True)
  assert cfgs["qwen2"].sliding_window is None             # use_sliding_window=False
  assert cfgs["mistral_sw"].sliding_window == 5
  assert (cfgs["llama3"].rope_type, cfgs["llama3"].rope_factor, cfgs["llama3"].rope_original_max_positions) == (
      "llama3", 4.0, 32)
  g = cfgs["gemma"]
  assert (g.norm_plus_one, g.embed_scale, g.tie_embeddings, g.activation, g.head_dim) == (
      True, True, True, "gelu_tanh", 24)


@pytest.mark.parity
def test_load_hf_bf16_keeps_dtype(hf_made):
  root, _ = hf_made
  cfg, params = load_hf(str(root / "llama_bf16"))
  _, params32 = load_hf(str(root / "llama_bf16"), dtype=np.float32)
  assert cfg.param_dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
    assert a.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(a.astype(np.float32), b)


def to_legacy(hf: dict, key: str) -> dict:
  """transformers 5's `rope_parameters` -> the published `rope_theta` + `rope_scaling` dialect."""
  hf = dict(hf)
  rope = dict(hf.pop("rope_parameters"))
  hf["rope_theta"] = rope.pop("rope_theta")
  rope_type = rope.pop("rope_type")
  hf["rope_scaling"] = None if rope_type == "default" else {key: rope_type, **rope}
  return hf


@pytest.mark.parity
@pytest.mark.parametrize("name,key", [("llama_linear", "type"), ("llama3", "rope_type"), ("qwen2", "type")])
def test_legacy_rope_dialect_loads_the_same(hf_made, tmp_path, name, key):
  root, ref = hf_made
  with open(root / name / "config.json") as f:
    hf = json.load(f)
  assert "rope_parameters" in hf and "rope_scaling" not in hf
  legacy = to_legacy(hf, key)
  assert config_from_hf(legacy) == config_from_hf(hf)
  shutil.copytree(root / name, tmp_path / name)
  with open(tmp_path / name / "config.json", "w") as f:
    json.dump(legacy, f)
  cfg, params = load_hf(str(tmp_path / name))
  assert rel_err(logits_of(cfg, params), ref[f"logits_{name}"]) <= REL_TOL


# ---------------------------------------------------------------------------------------------------
# Export: our random models -> transformers' logits
# ---------------------------------------------------------------------------------------------------
TINY = dict(vocab_size=VOCAB, max_position_embeddings=128)
EXPORTS = {   # name: (cfg, model_type, save_hf kwargs)
    "llama": (DecoderConfig.tiny(**TINY, qkv_bias=True, o_bias=True, mlp_bias=True), "llama", {}),
    "llama_linear": (DecoderConfig.tiny(**TINY, rope_type="linear", rope_factor=2.5, rope_theta=5000.0),
                     "llama", {}),
    "llama3_v5": (DecoderConfig.tiny(**TINY, rope_type="llama3", rope_factor=4.0, rope_original_max_positions=32),
                  "llama", dict(rope_dialect="rope_parameters")),
    "llama_sharded": (DecoderConfig.tiny(**TINY), "llama", dict(max_shard_bytes=30_000)),
    "llama_bf16": (DecoderConfig.tiny(**TINY), "llama", dict(dtype="bfloat16")),
    "mistral": (DecoderConfig.tiny(**TINY, sliding_window=5, rope_theta=1e6), "mistral", {}),
    "qwen2": (DecoderConfig.tiny(**TINY, qkv_bias=True, tie_embeddings=True), "qwen2", {}),
    "qwen2_sw": (DecoderConfig.tiny(**TINY, qkv_bias=True, sliding_window=4), "qwen2", {}),
    "gemma": (DecoderConfig.tiny(**TINY, head_dim=24, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                                 tie_embeddings=True, norm_eps=1e-6), "gemma", {}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("exported")
  ours = {}
  for seed, (name, (cfg, model_type, kw)) in enumerate(EXPORTS.items()):
    params = perturbed(cfg, seed)
    save_hf(str(root / name), cfg, params, model_type, **kw)
    if kw.get("dtype") == "bfloat16":   # what was written: the weights rounded to bf16
      params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(np.float32), params)
    ours[name] = (cfg, params)
  return root, ours


@pytest.fixture(scope="module")
def exported_ref(exported):
  refenv.require()
  root, _ = exported
  return refenv.run("hf_logits", {"tokens": TOKENS}, dirs=",".join(str(root / n) for n in EXPORTS))


@pytest.mark.parity
@pytest.mark.parametrize("k,name", list(enumerate(EXPORTS)))
def test_save_hf_loads_in_transformers(exported, exported_ref, k, name):
  _, ours = exported
  cfg, params = ours[name]
  assert str(exported_ref[f"class_{k}"]) == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                             "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[EXPORTS[name][1]]
  assert rel_err(logits_of(cfg, params), exported_ref[f"logits_{k}"]) <= REL_TOL


@pytest.mark.parametrize("name", list(EXPORTS))
def test_save_then_load_round_trips(exported, name):
  root, ours = exported
  cfg, params = ours[name]
  cfg2, params2 = load_hf(str(root / name), dtype=np.float32)
  assert cfg2 == cfg.replace(param_dtype="float32", head_dim=cfg.dim_per_head)   # config.json spells it out
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_save_hf_shards_with_an_index(exported):
  root, _ = exported
  d = root / "llama_sharded"
  shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
  assert len(shards) > 1 and "model.safetensors" not in shards
  with open(d / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards
  sizes = [sum(x.nbytes for x in load_file(str(d / s)).values()) for s in shards]
  assert index["metadata"]["total_size"] == sum(sizes)
  assert all(s <= 30_000 or len(load_file(str(d / f))) == 1 for s, f in zip(sizes, shards))


# ---------------------------------------------------------------------------------------------------
# Config dialects and errors (no reference environment needed)
# ---------------------------------------------------------------------------------------------------
# Published config.json files (their values, abridged to the fields that matter).
LLAMA31_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
              "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
GEMMA_2B = {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
            "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
            "hidden_act": "gelu", "hidden_activation": None, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "attention_bias": False, "rope_scaling": None}
QWEN2_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
             "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
             "max_window_layers": 21, "tie_word_embeddings": True}
MISTRAL_7B_V01 = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
                  "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False}


@pytest.mark.parametrize("hf,preset,changes", [
    (LLAMA31_8B, DecoderConfig.llama3_8b, {}),
    (GEMMA_2B, DecoderConfig.gemma_2b, dict(max_position_embeddings=8192)),
    (QWEN2_05B, DecoderConfig.qwen2_0_5b, {}),
    (MISTRAL_7B_V01, DecoderConfig.mistral_7b, dict(sliding_window=4096)),
])
def test_published_configs_give_the_presets(hf, preset, changes):
  assert config_from_hf(hf) == preset(**changes)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("dialect", ["legacy", "rope_parameters"])
def test_config_round_trips(model_type, dialect):
  base = dict(llama=DecoderConfig.llama3_8b(qkv_bias=True, o_bias=True), mistral=DecoderConfig.mistral_7b(
      sliding_window=4096), qwen2=DecoderConfig.qwen2_0_5b(sliding_window=1024), gemma=DecoderConfig.gemma_2b())
  cfg = base[model_type]
  hf = config_to_hf(cfg, model_type, rope_dialect=dialect)
  assert ("rope_parameters" in hf) == (dialect == "rope_parameters")
  assert config_from_hf(json.loads(json.dumps(hf))) == cfg.replace(head_dim=cfg.dim_per_head)


def test_qwen2_sliding_window_only_when_enabled():
  assert config_from_hf(QWEN2_05B).sliding_window is None
  on = {**QWEN2_05B, "use_sliding_window": True}
  assert config_from_hf({**on, "max_window_layers": 0}).sliding_window == 32768
  assert config_from_hf({**on, "max_window_layers": 24}).sliding_window is None
  with pytest.raises(ValueError, match="max_window_layers=21"):
    config_from_hf(on)      # transformers would slide layers 21..23 only
  with pytest.raises(ValueError, match="layer_types"):
    config_from_hf({**on, "layer_types": ["full_attention"] * 20 + ["sliding_attention"] * 4})


@pytest.mark.parametrize("change,pattern", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling\.rope_type='yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic'"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"rope_parameters\.rope_type='longrope'"),
    (dict(model_type="gpt2"), r"model_type='gpt2'"),
    (dict(model_type="gemma2"), r"model_type='gemma2'"),
    (dict(final_logit_softcapping=30.0), r"final_logit_softcapping=30\.0"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0\.5"),
    (dict(hidden_act="relu2"), r"hidden_act='relu2'"),
])
def test_unsupported_configs_fail_naming_the_field(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_from_hf({**LLAMA31_8B, **change})


def test_config_to_hf_rejects_what_a_family_cannot_express():
  with pytest.raises(ValueError, match="mistral.*qkv_bias"):
    config_to_hf(DecoderConfig.tiny(qkv_bias=True), "mistral")
  with pytest.raises(ValueError, match="qwen2.*qkv_bias"):
    config_to_hf(DecoderConfig.tiny(), "qwen2")
  with pytest.raises(ValueError, match="llama.*norm_plus_one"):
    config_to_hf(DecoderConfig.gemma_2b(), "llama")
  with pytest.raises(ValueError, match="model_type='falcon'"):
    config_to_hf(DecoderConfig.tiny(), "falcon")


@pytest.fixture()
def saved(tmp_path):
  cfg = DecoderConfig.tiny(vocab_size=VOCAB, num_layers=2)
  save_hf(str(tmp_path), cfg, perturbed(cfg, 0))
  return tmp_path


def test_missing_tensor_is_named(saved):
  tensors = load_file(str(saved / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf(str(saved))


def test_unexpected_tensor_is_named(saved):
  tensors = load_file(str(saved / "model.safetensors"))
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
  save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
    load_hf(str(saved))


def test_wrong_shape_is_named(saved):
  with open(saved / "config.json") as f:
    hf = json.load(f)
  with open(saved / "config.json", "w") as f:
    json.dump({**hf, "intermediate_size": hf["intermediate_size"] + 8}, f)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape"):
    load_hf(str(saved))


def test_no_weights_fails_clearly(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_to_hf(DecoderConfig.tiny(), "llama"), f)
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
    load_hf(str(tmp_path))


def test_raw_reader_agrees_with_safetensors(tmp_path):
  """The fallback for safetensors builds whose numpy API lacks bfloat16."""
  from models import _hf
  cfg = DecoderConfig.tiny(vocab_size=VOCAB, num_layers=1)
  save_hf(str(tmp_path), cfg, perturbed(cfg, 1), dtype="bfloat16")
  file = str(tmp_path / "model.safetensors")
  for name, x in load_file(file).items():
    assert x.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(_hf.read_tensor(file, name), x)


def test_bare_model_checkpoint_without_prefix(saved):
  """`LlamaModel.save_pretrained` (no LM head class) names tensors without 'model.'."""
  cfg, params = load_hf(str(saved))
  tensors = load_file(str(saved / "model.safetensors"))
  save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(saved / "model.safetensors"),
            metadata={"format": "pt"})
  _, bare = load_hf(str(saved))
  for a, b in zip(jax.tree.leaves(bare), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
