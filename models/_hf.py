"""Hugging Face interop: `config.json` <-> `DecoderConfig`, safetensors checkpoints <-> parameter dicts.

    cfg, params = load_hf("path/to/Llama-3.2-1B")                   # host numpy arrays
    logits = Decoder(cfg).apply(params, tokens)                     # == transformers' logits (float32)
    save_hf("out/", cfg, params, model_type="llama", dtype="bfloat16", max_shard_bytes=5 << 30)

No torch at run time: tensors go through the safetensors numpy API (bfloat16 as `ml_dtypes.bfloat16`).

Supported `model_type`s: llama (Llama 1/2/3), mistral, qwen2 and gemma (Gemma 1). Their decoders differ
only in switches of `DecoderConfig`:

    llama    attention_bias -> biases on q, k, v and o; mlp_bias -> biases on the MLP
    mistral  no biases; sliding_window: key j is visible from query i when i - window < j <= i
    qwen2    biases on q, k, v only; sliding_window only with use_sliding_window (and then on all layers)
    gemma    GeGLU (tanh gelu); embeddings times sqrt(hidden); RMSNorm scales by (1 + w); tied lm_head

RoPE: inverse frequencies theta^(-2i/hd), divided by `factor` for `linear`, and for `llama3` (Llama 3.1)
divided by `factor` above the wavelength `original_max_position_embeddings / low_freq_factor`, kept below
`original_max_position_embeddings / high_freq_factor`, and interpolated in between. `config.json` comes in
two dialects: `rope_theta` + `rope_scaling` (with key `type` or `rope_type`; most published checkpoints) and
`rope_parameters` (a dict holding `rope_theta` and `rope_type`; what transformers 5 writes). Both are read;
`config_to_hf` writes either. Anything this decoder cannot run exactly (yarn / dynamic / longrope RoPE,
partial rotary, logit soft-capping, per-layer attention patterns, quantized weights...) raises a ValueError
naming the field and its value rather than loading a silently different model.

Tensor layout: torch's `nn.Linear.weight` is [out, in]; our kernels are [in, out] and stacked over the
layers on a leading axis. `model.layers.{i}.self_attn.q_proj.weight [H*hd, D]` becomes row i of
`layers/attn/q_proj/kernel [L, D, H*hd]`; see `models/_decoder.py` for every path.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

import peft
from models._config import DecoderConfig

Params = Any

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"

# transformers' defaults for keys a config.json may leave out (their config classes' field defaults).
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048,
                  hidden_act="silu"),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=131_072,
                    hidden_act="silu", num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32_768,
                  hidden_act="silu", num_key_value_heads=32, sliding_window=4096, max_window_layers=28),
    "gemma": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=8192,
                  hidden_act="gelu_pytorch_tanh", num_key_value_heads=16, head_dim=256),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# HF activation names (transformers' ACT2FN) -> ours.
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}

# Fields whose presence with a value other than the neutral one changes the model in a way we do not run.
_NEUTRAL = {
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "partial_rotary_factor": 1.0,
    "use_bidirectional_attention": (None, False), "quantization_config": None, "query_pre_attn_scalar": None,
}


# ---------------------------------------------------------------------------------------------------
# config.json <-> DecoderConfig
# ---------------------------------------------------------------------------------------------------
def _unsupported(field: str, value, why: str = "") -> ValueError:
  return ValueError(f"unsupported Hugging Face config: {field}={value!r}{': ' + why if why else ''}")


def _rope_from_hf(hf: Mapping) -> dict:
  """Both dialects -> DecoderConfig's rope_* fields."""
  params = hf.get("rope_parameters")
  field = "rope_parameters"
  if params is None:
    params, field = hf.get("rope_scaling"), "rope_scaling"
  params = dict(params or {})
  if params and all(isinstance(v, Mapping) for v in params.values()):
    # transformers 5 nests per layer type (e.g. {"full_attention": {...}}); one shared setting is all we run.
    nested = list(params.values())
    if any(dict(p) != dict(nested[0]) for p in nested):
      raise _unsupported(field, hf.get(field), "a different RoPE per layer type")
    params = dict(nested[0])
  rope_type = params.get("rope_type", params.get("type")) or "default"
  theta = params.get("rope_theta", hf.get("rope_theta"))
  out = dict(rope_theta=float(10_000.0 if theta is None else theta), rope_type=rope_type)
  partial = params.get("partial_rotary_factor", 1.0)
  if partial not in (None, 1, 1.0):
    raise _unsupported(f"{field}.partial_rotary_factor", partial, "RoPE on the whole head only")
  if rope_type == "default":
    return out
  if rope_type not in ("linear", "llama3"):
    raise _unsupported(f"{field}.rope_type", rope_type, "supported RoPE types are default, linear, llama3")
  if params.get("factor") is None:
    raise ValueError(f"{field} of rope_type={rope_type!r} lacks 'factor'")
  out["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    for k in ("low_freq_factor", "high_freq_factor"):
      if params.get(k) is None:
        raise ValueError(f"{field} of rope_type='llama3' lacks {k!r}")
    out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_positions=int(params.get("original_max_position_embeddings")
                                               or hf.get("max_position_embeddings")))
  return out


def _activation_from_hf(hf: Mapping, model_type: str) -> str:
  if model_type == "gemma":
    # Gemma 1 checkpoints say hidden_act="gelu" but mean the tanh approximation (transformers converts it);
    # older ones carry the real name in hidden_activation.
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    field = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    if name == "gelu":
      name = "gelu_pytorch_tanh"
  else:
    name, field = hf.get("hidden_act") or "silu", "hidden_act"
  if name not in _ACT_FROM_HF:
    raise _unsupported(field, name, f"supported: {', '.join(_ACT_FROM_HF)}")
  return _ACT_FROM_HF[name]


def _sliding_window_from_hf(hf: Mapping, model_type: str, num_layers: int) -> Optional[int]:
  window = None
  if model_type == "mistral":
    window = hf.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
  elif model_type == "qwen2" and hf.get("use_sliding_window"):
    window = hf.get("sliding_window", _DEFAULTS["qwen2"]["sliding_window"])
    if window is not None and not hf.get("layer_types"):
      first = hf.get("max_window_layers", _DEFAULTS["qwen2"]["max_window_layers"])
      if 0 < first < num_layers:   # transformers slides only layers >= max_window_layers
        raise _unsupported("max_window_layers", first,
                           f"sliding window on some of the {num_layers} layers only")
      if first >= num_layers:
        window = None
  layer_types = hf.get("layer_types")
  if layer_types:
    kinds = set(layer_types)
    if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
      raise _unsupported("layer_types", sorted(kinds), "one attention pattern on all layers only")
    if kinds == {"full_attention"}:
      window = None
    elif window is None:
      raise ValueError("layer_types says sliding_attention but sliding_window is not set")
  return None if window is None else int(window)


def config_from_hf(hf_config: Mapping) -> DecoderConfig:
  """A Hugging Face `config.json` (as a dict) -> `DecoderConfig`. Raises ValueError on what we cannot run."""
  hf = dict(hf_config)
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise _unsupported("model_type", model_type, f"supported: {', '.join(FAMILIES)}")
  for k in _REQUIRED:
    if hf.get(k) is None:
      raise ValueError(f"Hugging Face config of model_type={model_type!r} lacks {k!r}")
  for k, neutral in _NEUTRAL.items():
    ok = neutral if isinstance(neutral, tuple) else (neutral,)
    if k in hf and hf[k] not in ok:
      raise _unsupported(k, hf[k])
  d = _DEFAULTS[model_type]

  def get(k):
    return hf[k] if hf.get(k) is not None else d.get(k)

  heads = int(hf["num_attention_heads"])
  attention_bias = bool(hf.get("attention_bias", False))
  bias = dict(llama=(attention_bias, attention_bias, bool(hf.get("mlp_bias", False))),
              mistral=(False, False, False), qwen2=(True, False, False),
              gemma=(attention_bias, attention_bias, False))[model_type]
  layers = int(hf["num_hidden_layers"])
  return DecoderConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads") or heads),
      intermediate_size=int(hf["intermediate_size"]),
      head_dim=None if get("head_dim") is None else int(get("head_dim")),
      activation=_activation_from_hf(hf, model_type),
      norm_eps=float(get("rms_norm_eps")),
      norm_plus_one=model_type == "gemma",
      embed_scale=model_type == "gemma",
      tie_embeddings=bool(get("tie_word_embeddings")),
      qkv_bias=bias[0], o_bias=bias[1], mlp_bias=bias[2],
      max_position_embeddings=int(get("max_position_embeddings")),
      sliding_window=_sliding_window_from_hf(hf, model_type, layers),
      init_std=float(hf.get("initializer_range", 0.02)),
      **_rope_from_hf(hf),
  )


def _rope_to_hf(cfg: DecoderConfig) -> Optional[dict]:
  if cfg.rope_type == "default":
    return None
  rope = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_positions)
  return rope


def config_to_hf(cfg: DecoderConfig, model_type: str = "llama", *, rope_dialect: str = "legacy",
                 dtype: Optional[str] = None, **extra) -> dict:
  """`DecoderConfig` -> a `config.json` dict that transformers loads as `model_type`.

  Args:
    rope_dialect: "legacy" writes `rope_theta` + `rope_scaling` (read by transformers 4 and 5);
      "rope_parameters" writes transformers 5's single dict.
    dtype: the weights' dtype, written as `torch_dtype`; default cfg.param_dtype.
    **extra: more keys (bos_token_id, eos_token_id...), written as given.
  Raises:
    ValueError: when the family cannot express cfg (e.g. Mistral with biases, Qwen2 without q/k/v biases).
  """
  if model_type not in FAMILIES:
    raise _unsupported("model_type", model_type, f"supported: {', '.join(FAMILIES)}")
  if rope_dialect not in ("legacy", "rope_parameters"):
    raise ValueError(f"rope_dialect={rope_dialect!r}; valid: 'legacy', 'rope_parameters'")
  gemma = model_type == "gemma"

  def need(cond, field, why):
    if not cond:
      raise ValueError(f"model_type={model_type!r} cannot express {field}={getattr(cfg, field)!r}: {why}")

  need(cfg.norm_plus_one == gemma, "norm_plus_one", "Gemma's RMSNorm scales by 1 + w, the others by w")
  need(cfg.embed_scale == gemma, "embed_scale", "only Gemma scales embeddings by sqrt(hidden)")
  if model_type == "mistral":
    need(not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias), "qkv_bias", "Mistral has no biases")
  elif model_type == "qwen2":
    need(cfg.qkv_bias, "qkv_bias", "Qwen2 always biases q, k, v")
    need(not cfg.o_bias, "o_bias", "Qwen2 never biases o_proj")
    need(not cfg.mlp_bias, "mlp_bias", "Qwen2 has no MLP biases")
  else:
    need(cfg.qkv_bias == cfg.o_bias, "o_bias", "attention_bias biases q, k, v and o together")
    if gemma:
      need(not cfg.mlp_bias, "mlp_bias", "Gemma has no MLP biases")
      need(cfg.activation != "gelu", "activation", "transformers runs Gemma's 'gelu' as the tanh approximation")
  if model_type in ("llama", "gemma"):
    need(cfg.sliding_window is None, "sliding_window", "no sliding-window attention in this family")
  if model_type in ("mistral", "qwen2"):
    need(cfg.activation == "silu", "activation", "the family's config always uses silu")

  hf = {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.dim_per_head,
      "hidden_act": _ACT_TO_HF[cfg.activation],
      "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": cfg.init_std,
      "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": str(_np_dtype(dtype or cfg.param_dtype)),
  }
  if model_type in ("llama", "gemma"):
    hf["attention_bias"] = cfg.qkv_bias
  if model_type == "llama":
    hf["mlp_bias"] = cfg.mlp_bias
  if gemma:
    hf["hidden_activation"] = hf["hidden_act"]
  if model_type == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  if model_type == "qwen2":
    sliding = cfg.sliding_window is not None
    hf.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
              max_window_layers=0 if sliding else cfg.num_layers,
              layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.num_layers)
  rope = _rope_to_hf(cfg)
  if rope_dialect == "legacy":
    hf.update(rope_theta=cfg.rope_theta, rope_scaling=rope)
  else:
    hf["rope_parameters"] = {"rope_type": "default", **(rope or {}), "rope_theta": cfg.rope_theta}
  hf.update(extra)
  return hf


# ---------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------
def _layout(cfg: DecoderConfig) -> list[tuple[str, str, tuple[int, ...]]]:
  """[(our path, HF name with '{i}' for the layer index, torch shape of one tensor)]."""
  D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.dim_per_head
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  rows = [("embed/embedding", "model.embed_tokens.weight", (V, D))]

  def linear(path, name, din, dout, bias):
    rows.append((f"layers/{path}/kernel", f"model.layers.{{i}}.{name}.weight", (dout, din)))
    if bias:
      rows.append((f"layers/{path}/bias", f"model.layers.{{i}}.{name}.bias", (dout,)))

  rows.append(("layers/attn_norm/scale", "model.layers.{i}.input_layernorm.weight", (D,)))
  linear("attn/q_proj", "self_attn.q_proj", D, q, cfg.qkv_bias)
  linear("attn/k_proj", "self_attn.k_proj", D, kv, cfg.qkv_bias)
  linear("attn/v_proj", "self_attn.v_proj", D, kv, cfg.qkv_bias)
  linear("attn/o_proj", "self_attn.o_proj", q, D, cfg.o_bias)
  rows.append(("layers/mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", (D,)))
  linear("mlp/gate_proj", "mlp.gate_proj", D, F, cfg.mlp_bias)
  linear("mlp/up_proj", "mlp.up_proj", D, F, cfg.mlp_bias)
  linear("mlp/down_proj", "mlp.down_proj", F, D, cfg.mlp_bias)
  rows.append(("final_norm/scale", "model.norm.weight", (D,)))
  if not cfg.tie_embeddings:
    rows.append(("lm_head/kernel", "lm_head.weight", (V, D)))
  return rows


def _hf_to_ours(path: str, x: np.ndarray) -> np.ndarray:
  return x.T if path.endswith("/kernel") else x


def _get_path(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set_path(tree, path, value):
  *parents, leaf = path.split("/")
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[leaf] = value


def _np_dtype(dtype) -> np.dtype:
  if dtype is None:
    return None
  if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
    import ml_dtypes   # pylint: disable=g-import-not-at-top  (a jax dependency)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# Reading safetensors
# ---------------------------------------------------------------------------------------------------
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_tensor(file: str, name: str) -> np.ndarray:
  """Reads one tensor of a safetensors file from its header and bytes (a read-only view of just those
  bytes; bfloat16 and float8 as ml_dtypes), also for dtypes an older safetensors' numpy API lacks."""
  import ml_dtypes   # pylint: disable=g-import-not-at-top
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    info = json.loads(f.read(n))[name]
    start, end = info["data_offsets"]
    f.seek(8 + n + start)
    buf = f.read(end - start)
  dt = info["dtype"]
  dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[dt])) if dt in _RAW_DTYPES else np.dtype(dt.lower())
  return np.frombuffer(buf, dtype).reshape(info["shape"])


class _Checkpoint(contextlib.ExitStack):
  """Name -> tensor over one `model.safetensors` or the shards an index lists; files opened lazily."""

  def __init__(self, path: str):
    super().__init__()
    from safetensors import safe_open   # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    index, single = os.path.join(path, _INDEX_FILE), os.path.join(path, _SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, framework="np") as f:
        self.files = {k: single for k in f.keys()}
    else:
      held = sorted(os.listdir(path)) if os.path.isdir(path) else []
      raise FileNotFoundError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {path} (it holds: {held}); "
                              "convert .bin checkpoints to safetensors first")
    self._open = {}

  def get(self, name: str) -> np.ndarray:
    file = self.files[name]
    if file not in self._open:
      self._open[file] = self.enter_context(self._safe_open(file, framework="np"))
    try:
      return self._open[file].get_tensor(name)
    except (TypeError, KeyError, ValueError, RuntimeError):
      return read_tensor(file, name)


def _prefix_fix(names) -> Callable[[str], str]:
  """Checkpoints of the bare `LlamaModel` lack the 'model.' prefix of `...ForCausalLM`."""
  if "model.embed_tokens.weight" not in names and "embed_tokens.weight" in names:
    return lambda n: n[len("model."):] if n.startswith("model.") else n
  return lambda n: n


def is_classifier(hf_config: Mapping) -> bool:
  """Whether config.json describes a `*ForSequenceClassification` checkpoint (a `score` head)."""
  return any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or ())


def _score_layout(cfg: DecoderConfig, hf: Mapping) -> list[tuple[str, str, tuple[int, ...]]]:
  # transformers' PretrainedConfig: num_labels is len(id2label), 2 when config.json names none.
  num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
  rows = _layout(cfg.replace(tie_embeddings=True))     # the body; a classifier has no lm_head
  return rows + [("lm_head/kernel", "score.weight", (num_labels, cfg.hidden_size))]


def load_hf(path: str, dtype=None, *, head: str = "lm") -> tuple[DecoderConfig, Params]:
  """Reads a Hugging Face checkpoint directory (config.json + safetensors, single or sharded).

  Args:
    path: the directory.
    dtype: cast every tensor to this dtype; default: keep the checkpoint's dtype.
    head: "lm" for a causal LM (`lm_head.weight` or tied embeddings); "score" for a
      `*ForSequenceClassification` checkpoint such as a reward model: its `score.weight` [num_labels, D]
      becomes the output layer (`lm_head/kernel` [D, num_labels], cfg untied), so `Decoder(cfg).apply`
      gives [B, T, num_labels] scores per position. transformers reads them at the last token that is not
      `pad_token_id` (`score_position`).
  Returns:
    (cfg, params): `param_dtype` of cfg is the weights' dtype; params are host numpy arrays laid out as
    `Decoder(cfg).init` lays them out (`jax.device_put` them with the shardings you want).
  Raises:
    ValueError: an unsupported config, the wrong `head` for the checkpoint, or a tensor missing,
      unexpected or of the wrong shape (named).
  """
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf)
  if head not in ("lm", "score"):
    raise ValueError(f"head={head!r}: expected 'lm' or 'score'")
  arch = ", ".join(hf.get("architectures") or ()) or "causal LM"
  if head == "lm" and is_classifier(hf):
    raise ValueError(f"{path} is a {arch} checkpoint (a `score` head, no language-model head); "
                     "load it with head='score' (e.g. as a reward model)")
  if head == "score" and not is_classifier(hf):
    raise ValueError(f"head='score' needs a *ForSequenceClassification checkpoint; {path} is {arch}")
  layout = _score_layout(cfg, hf) if head == "score" else _layout(cfg)
  if head == "score":
    cfg = cfg.replace(tie_embeddings=False)
  want = _np_dtype(dtype)
  params: dict = {}
  with _Checkpoint(path) as ckpt:
    names = set(ckpt.files)
    rename = _prefix_fix(names)
    used = set()
    missing = []

    def read(name, shape):
      name = rename(name)
      if name not in names:
        missing.append(name)
        return None
      used.add(name)
      x = ckpt.get(name)
      if tuple(x.shape) != shape:
        raise ValueError(f"tensor {name} has shape {tuple(x.shape)}, config.json implies {shape}")
      return x if want is None else x.astype(want)

    for ours, name, shape in layout:
      if "{i}" in name:
        rows = [read(name.format(i=i), shape) for i in range(cfg.num_layers)]
        value = None if any(r is None for r in rows) else np.stack([_hf_to_ours(ours, r) for r in rows])
      else:
        x = read(name, shape)
        value = None if x is None else np.ascontiguousarray(_hf_to_ours(ours, x))
      if value is not None:
        _set_path(params, ours, value)
    if missing:
      raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s) its config.json implies: "
                       f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    # Buffers and tied copies that some exports carry are not weights of their own.
    ignorable = re.compile(r"(.*rotary_emb\.inv_freq$)" + ("|(lm_head\\.weight$)" if cfg.tie_embeddings else ""))
    unexpected = sorted(n for n in names - used if not ignorable.match(n))
    if unexpected:
      raise ValueError(f"checkpoint {path} holds {len(unexpected)} tensor(s) config.json does not explain: "
                       f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
  cfg = cfg.replace(param_dtype=str(params["embed"]["embedding"].dtype))
  return cfg, params


def score_position(tokens: Sequence[int], pad_id: Optional[int]) -> int:
  """Where transformers' sequence-classification heads read the score: the last token that is not
  `pad_token_id` (so a sequence ending in a pad token that doubles as eos is read before it), the last
  token when the config names no pad token."""
  if pad_id is None:
    return len(tokens) - 1
  idx = [i for i, t in enumerate(tokens) if int(t) != int(pad_id)]
  return idx[-1] if idx else 0


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: Optional[int]) -> list[dict[str, np.ndarray]]:
  """Greedy in tensor order, like `save_pretrained`: a tensor larger than the limit gets its own shard."""
  if max_shard_bytes is None:
    return [tensors]
  shards, size = [{}], 0
  for k, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = x
    size += x.nbytes
  return shards


def save_hf(path: str, cfg: DecoderConfig, params: Params, model_type: str = "llama", dtype=None,
            max_shard_bytes: Optional[int] = None, *, rope_dialect: str = "legacy",
            generation_config: Optional[Mapping] = None, **config_extra) -> None:
  """Writes a checkpoint `transformers.AutoModelForCausalLM.from_pretrained(path)` loads.

  Args:
    path: the directory (created; earlier `model*.safetensors` files in it are removed).
    cfg, params: the model; adapters in params are merged first (`peft.merge`).
    model_type: llama | mistral | qwen2 | gemma (see `config_to_hf` for what each can express).
    dtype: dtype of the written tensors; default: each parameter's own dtype.
    max_shard_bytes: split into `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
      when the tensors take more bytes than this.
    generation_config: written as generation_config.json when given.
    **config_extra: more config.json keys (bos_token_id, eos_token_id...).
  """
  import jax   # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file   # pylint: disable=g-import-not-at-top
  want = _np_dtype(dtype)
  params = jax.device_get(peft.merge(params))   # adapters and layer-sampling nodes -> plain arrays
  hf = config_to_hf(cfg, model_type, rope_dialect=rope_dialect,
                    dtype=str(want or np.asarray(params["embed"]["embedding"]).dtype), **config_extra)
  tensors = {}
  for ours, name, shape in _layout(cfg):
    try:
      x = np.asarray(_get_path(params, ours))
    except (KeyError, TypeError) as e:
      raise ValueError(f"params lack {ours}, which cfg implies (HF tensor {name})") from e
    if want is not None:
      x = x.astype(want)
    layers = range(cfg.num_layers) if "{i}" in name else [None]
    for i in layers:
      t = _hf_to_ours(ours, x if i is None else x[i])   # the transpose is its own inverse
      if tuple(t.shape) != shape:
        raise ValueError(f"{ours} gives {name} of shape {tuple(t.shape)}, cfg implies {shape}")
      tensors[name.format(i=i)] = np.ascontiguousarray(t)

  os.makedirs(path, exist_ok=True)
  for f in os.listdir(path):
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
      os.remove(os.path.join(path, f))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if generation_config is not None:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump(dict(generation_config), f, indent=2)
  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}   # transformers refuses safetensors files without a known format
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, _SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  total = sum(x.nbytes for x in tensors.values())
  with open(os.path.join(path, _INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
