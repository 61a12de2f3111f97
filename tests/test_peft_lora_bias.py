"""LoRA's optional bias on B (PEFT's `LoraConfig(lora_bias=True)`) and `peft.import_adapter` refusing
tensors it would not read (no reference stack; the PEFT parity cases are in test_peft_parity.py and
test_peft_export.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peft
from models import Decoder, DecoderConfig

CFG = DecoderConfig.tiny(vocab_size=50)
PARAMS = Decoder(CFG).init(jax.random.PRNGKey(0))
TARGETS = ("q_proj", "down_proj")


def _biased(seed=0):
  adapted = peft.apply(PARAMS, {TARGETS: peft.AdapterSpec("lora", rank=3, alpha=6,
                                                          options={"lora_bias": True})})
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda n: n.replace(b=n.b + 0.3 * rng.normal(size=n.b.shape).astype(np.float32),
                                          bias=n.bias + rng.normal(size=n.bias.shape).astype(np.float32))
                      if isinstance(n, peft.LoRA) else n, adapted, is_leaf=peft.is_adapter)


def test_lora_bias_forward_formula_and_training():
  node = _biased()["layers"]["attn"]["q_proj"]["kernel"]
  one = jax.tree.map(lambda x: x[0], node)
  assert one.bias.shape == one.b.shape[-1:]
  x = np.random.RandomState(1).normal(size=(5, one.a.shape[0])).astype(np.float32)
  x64 = x.astype(np.float64)
  want = x64 @ np.asarray(one.base, np.float64) + one.scale * (
      x64 @ np.asarray(one.a, np.float64) @ np.asarray(one.b, np.float64) + np.asarray(one.bias, np.float64))
  np.testing.assert_allclose(one.dot(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  # The bias is trained (PEFT trains lora_B.bias) and starts at zero.
  trainable, _ = peft.split(peft.apply(PARAMS, {TARGETS: peft.AdapterSpec(options={"lora_bias": True})}))
  t = trainable["layers"]["attn"]["q_proj"]["kernel"]
  assert t.bias is not None and not np.any(t.bias)
  # Without the option there is no bias, as PEFT's default.
  plain = peft.apply(PARAMS, {TARGETS: peft.AdapterSpec()})["layers"]["attn"]["q_proj"]["kernel"]
  assert plain.bias is None


def test_lora_bias_round_trip_and_merge_refused(tmp_path):
  adapted = _biased()
  config = peft.export_adapter(str(tmp_path), adapted, None, "llama")
  assert config["lora_bias"] is True
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias"
  np.testing.assert_array_equal(tensors[key], adapted["layers"]["attn"]["q_proj"]["kernel"].bias[1])
  back = peft.import_adapter(str(tmp_path), peft.strip(adapted))
  for p in ("q_proj",):
    np.testing.assert_array_equal(back["layers"]["attn"][p]["kernel"].bias,
                                  adapted["layers"]["attn"][p]["kernel"].bias)
  with pytest.raises(ValueError, match="lora_bias cannot be merged"):
    peft.merge(adapted)


def test_import_refuses_unknown_tensors_naming_them(tmp_path):
  adapted = _biased()
  peft.export_adapter(str(tmp_path), adapted, None, "llama")
  path = str(tmp_path / "adapter_model.safetensors")
  tensors = load_file(path)
  extra = "base_model.model.model.layers.0.mlp.down_proj.lora_C.weight"
  save_file({**tensors, extra: np.zeros((2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match=r"does not read.*lora_C\.weight"):
    peft.import_adapter(str(tmp_path), peft.strip(adapted))
  # A DoRA adapter has no lora_bias here: its biases would be dropped, so they are refused by name.
  dora = peft.apply(PARAMS, {TARGETS: peft.AdapterSpec("dora", rank=3, alpha=6)})
  peft.export_adapter(str(tmp_path / "dora"), dora, None, "llama")
  dpath = str(tmp_path / "dora" / "adapter_model.safetensors")
  t = load_file(dpath)
  bias_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
  save_file({**t, bias_key: np.ones(t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape[0], np.float32)}, dpath)
  with pytest.raises(ValueError, match=r"DoRA.*does not read.*q_proj\.lora_B\.bias"):
    peft.import_adapter(str(tmp_path / "dora"), peft.strip(dora))


def test_import_refuses_bias_config_mismatch(tmp_path):
  """A file whose lora_B.bias tensors disagree with its config's lora_bias is refused, not half-read."""
  adapted = _biased()
  peft.export_adapter(str(tmp_path), adapted, None, "llama")
  import json
  cfg_path = tmp_path / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["lora_bias"] = False
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="lora_B.bias in"):
    peft.import_adapter(str(tmp_path), peft.strip(adapted))


def test_peft_base_weight_copy_is_checked_not_dropped(tmp_path):
  """PEFT may save a targeted layer's base weight (`lm_head.base_layer.weight`): it must equal the base the
  adapter is imported onto."""
  adapted = peft.apply(PARAMS, {("lm_head",): peft.AdapterSpec(rank=2, alpha=4)})
  peft.export_adapter(str(tmp_path), adapted, None, "llama")
  path = str(tmp_path / "adapter_model.safetensors")
  tensors = load_file(path)
  w = np.ascontiguousarray(np.asarray(PARAMS["lm_head"]["kernel"], np.float32).T)
  save_file({**tensors, "base_model.model.lm_head.base_layer.weight": w}, path)
  back = peft.import_adapter(str(tmp_path), PARAMS)
  assert isinstance(back["lm_head"]["kernel"], peft.LoRA)
  save_file({**tensors, "base_model.model.lm_head.base_layer.weight": w + 1.0}, path)
  with pytest.raises(ValueError, match="lm_head.base_layer.weight.*differs"):
    peft.import_adapter(str(tmp_path), PARAMS)
