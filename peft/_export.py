"""HF PEFT interop: our adapter nodes <-> `adapter_model.safetensors` + `adapter_config.json`.

    peft.export_adapter("out/adapter", params, config.peft, model_type="llama")
    # torch side: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    params = peft.import_adapter("some/peft_adapter", params)      # adapter nodes on our base kernels

Key layout (adapter name stripped, as `save_pretrained` writes it), one tensor per layer:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight      [r, in]    = a[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight      [out, r]   = b[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.bias        [out]      (lora_bias) = bias[i]
    base_model.model.model.layers.{i}.mlp.down_proj.lora_magnitude_vector [out]      (DoRA) = m[i]
    base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l              [out, 1] / [1, in] (IA3)
    base_model.model.lm_head.lora_A.weight                                 (unstacked lm_head)

Each node class writes its own tensors and config fields (`hf_tensors`, `hf_config`, `from_hf`; see
`register_hf_format` in peft/_apply.py). The config always says `init_lora_weights: true`, so loading never
re-runs an initialisation that would rewrite the base. PiSSA/OLoRA adapters trained on a residual base are
either exported with `initial=` (converted to a rank-2r LoRA on the original base, as PEFT's
`path_initial_model_for_weight_conversion`), or as they are with `residual_ok=True`, and then the base to load
them on is the residual one: `models.save_hf(dir, cfg, peft.strip(params))`. The same holds for the data inits
that rewrite the base (CorDA, LoRA-GA); LoftQ's adapter exports only with `residual_ok=True`, beside its
dequantised base.

A merged export (a plain transformers checkpoint) is `models.save_hf(dir, cfg, params)`, which folds every
adapter in with `peft.merge` (a quantised base is written dequantised).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from peft._apply import residual_to_lora, spec_from_config
from peft._node import HF_FORMATS, AdapterSpec
from peft._core import is_adapter, map_with_path
from peft._data_init import get_data_init, is_data_init
from peft._init import is_residual
from peft._quant import QuantizedWeight

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_HF_PARENT = {"attn": "self_attn", "mlp": "mlp"}
_OUR_PARENT = {v: k for k, v in _HF_PARENT.items()}
_KEY = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)|lm_head)\.(.+)")
FAMILIES = ("llama", "mistral", "qwen2", "gemma")   # same module names in all four
BASE_COPY = "base_layer.weight"   # PEFT's copy of a targeted layer's base weight: checked, not loaded


def hf_module(path: str) -> tuple[str, str]:
  """Our kernel path -> (HF module name with '{i}' for stacked layers, short name for target_modules)."""
  parts = path.split("/")
  if len(parts) == 4 and parts[0] == "layers" and parts[1] in _HF_PARENT and parts[3] == "kernel":
    return f"model.layers.{{i}}.{_HF_PARENT[parts[1]]}.{parts[2]}", f"{_HF_PARENT[parts[1]]}.{parts[2]}"
  if path == "lm_head/kernel":
    return "lm_head", "lm_head"
  raise ValueError(f"{path} has no Hugging Face module name (adaptable: layers/(attn|mlp)/*/kernel, "
                   "lm_head/kernel)")


def _as_spec(spec_or_cfg) -> Optional[AdapterSpec]:
  if spec_or_cfg is None or isinstance(spec_or_cfg, AdapterSpec):
    return spec_or_cfg
  return spec_from_config(spec_or_cfg)


def needs_initial(spec_or_cfg) -> bool:
  """True when `export_adapter` needs `initial=` (the adapted params before training) to export a plain
  LoRA for the original base: inits that move part of W into the adapter (PiSSA, OLoRA, CorDA, LoRA-GA)."""
  spec = _as_spec(spec_or_cfg)
  if spec is None:
    return False
  data_init = get_data_init(spec.init) if is_data_init(spec.init) else None
  if data_init is not None:
    return data_init.mutates_base and not data_init.quantizes_base
  return is_residual(spec.init)


def _adapter_nodes(params) -> dict[str, Any]:
  nodes = {}
  def visit(path, leaf):
    if is_adapter(leaf) and not isinstance(leaf, QuantizedWeight):
      nodes[path] = leaf
    return leaf
  map_with_path(visit, params, is_leaf=is_adapter)
  return nodes


def export_adapter(path: str, params, spec_or_cfg=None, model_type: str = "llama", *, initial=None,
                   residual_ok: bool = False, base_model_name_or_path: Optional[str] = None) -> dict:
  """Writes `adapter_model.safetensors` + `adapter_config.json` that HF `peft` loads onto the transformers
  model of `model_type`. Returns the config written.

  Args:
    params: the adapted params (one HF PEFT type for all nodes: LoRA or DoRA or IA3).
    spec_or_cfg: the AdapterSpec or config.peft used (for use_rslora and the init); optional.
    initial: the adapted params before training; converts residual-base adapters (PiSSA, OLoRA) into
      plain LoRA on the original base (`residual_to_lora`).
    residual_ok: export a residual-base adapter as it is (it then belongs on the residual base).
  """
  from safetensors.numpy import save_file   # pylint: disable=g-import-not-at-top
  if model_type not in FAMILIES:
    raise ValueError(f"model_type={model_type!r}; valid: {', '.join(FAMILIES)}")
  spec = _as_spec(spec_or_cfg)
  data_init = get_data_init(spec.init) if spec is not None and is_data_init(spec.init) else None
  if initial is not None and data_init is not None and data_init.quantizes_base:
    raise ValueError(f"init={spec.init!r} replaced the base by a quantised approximation, so the original "
                     "base is not W_res + s A0 B0 and no LoRA on it reproduces this model: export with "
                     "residual_ok=True and ship the base (models.save_hf(dir, cfg, peft.strip(params)))")
  if initial is not None:
    params = residual_to_lora(params, initial)
  elif spec is not None and (is_residual(spec.init) or (data_init is not None and data_init.mutates_base)) \
      and not residual_ok:
    raise ValueError(f"init={spec.init!r} trained on a residual base: pass initial= (the params before "
                     "training) to export plain LoRA for the original base, or residual_ok=True and ship "
                     "the residual base (models.save_hf(dir, cfg, peft.strip(params)))")
  nodes = jax.device_get(_adapter_nodes(params))
  if not nodes:
    raise ValueError("params hold no adapter to export")
  classes = {type(n) for n in nodes.values()}
  if len(classes) > 1:
    raise ValueError(f"one adapter type per HF PEFT export, got {sorted(c.__name__ for c in classes)}")
  cls = classes.pop()
  if cls not in HF_FORMATS.get(getattr(cls, "hf_peft_type", None), []):
    raise ValueError(f"{cls.__name__} has no HF PEFT format; formats: "
                     f"{ {k: [c.__name__ for c in v] for k, v in HF_FORMATS.items()} }")

  tensors, by_module = {}, {}
  for p, node in nodes.items():
    template, short = hf_module(p)
    node = node.replace(base=None, **({"rng": None} if hasattr(node, "rng") else {}))
    by_module[short] = node
    layers = range(jax.tree.leaves(node)[0].shape[0]) if "{i}" in template else [None]
    for i in layers:
      one = node if i is None else jax.tree.map(lambda x: x[i], node)
      for suffix, x in one.hf_tensors().items():
        tensors[f"{_PREFIX}{template.format(i=i)}.{suffix}"] = np.ascontiguousarray(x, np.float32)
  # Tensors of the whole adapter rather than of one module (VeRA's shared random basis `base_model.vera_A`).
  if hasattr(cls, "hf_shared"):
    tensors.update({k: np.ascontiguousarray(x, np.float32) for k, x in cls.hf_shared(by_module).items()})

  config = {"peft_type": cls.hf_peft_type, "task_type": "CAUSAL_LM",
            "target_modules": sorted({s.split(".")[-1] for s in by_module}),
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "modules_to_save": None, **cls.hf_config(by_module, spec)}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return config


def import_adapter(path: str, params):
  """Reads a PEFT adapter directory into adapter nodes on `params`' kernels (an existing adapter's base,
  e.g. a PiSSA residual, is kept; a quantised base stays quantised). Every tensor must be used: a tensor the
  adapter type does not read raises, naming it."""
  from safetensors.numpy import load_file   # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, CONFIG)) as f:
    config = json.load(f)
  peft_type = config.get("peft_type")
  candidates = [c for c in HF_FORMATS.get(peft_type, []) if c.hf_accepts(config)]
  if not candidates:
    raise ValueError(f"{path}: peft_type={peft_type!r} with these options has no adapter here; "
                     f"valid: {sorted(HF_FORMATS)}")
  cls = candidates[0]
  tensors = load_file(os.path.join(path, WEIGHTS))
  # Adapter-wide tensors (`hf_shared_names`, e.g. VeRA's basis) go to every module's `from_hf(shared=...)`.
  shared_names = getattr(cls, "hf_shared_names", ())
  shared = {k: tensors.pop(k) for k in shared_names if k in tensors}
  extra = {"shared": shared} if shared_names else {}
  # Every tensor must be read: one this adapter type does not know would otherwise be dropped silently
  # (e.g. lora_B.bias under a class without lora_bias, or modules_to_save copies).
  known = set(cls.hf_tensor_names) | {BASE_COPY}
  unknown = sorted(k for k in tensors if (m := _KEY.fullmatch(k)) is not None and m.group(5) not in known)
  if unknown:
    raise ValueError(f"{path}: {len(unknown)} tensor(s) that {cls.__name__} ({peft_type}) does not read, so "
                     f"importing would ignore them: {', '.join(unknown[:8])}"
                     f"{' ...' if len(unknown) > 8 else ''}; it reads {', '.join(sorted(known))} per module")
  groups: dict[str, dict] = {}
  copies: dict[str, dict] = {}
  for key, x in tensors.items():
    m = _KEY.fullmatch(key)
    if m is None:
      raise ValueError(f"{path}: tensor {key} names no module we have (expected {_PREFIX}model.layers.N."
                       "(self_attn|mlp).NAME.* or lm_head.*)")
    if m.group(1) == "lm_head":
      ours, layer, module = "lm_head/kernel", None, "lm_head"
    else:
      ours = f"layers/{_OUR_PARENT[m.group(3)]}/{m.group(4)}/kernel"
      layer, module = int(m.group(2)), m.group(1)
    if m.group(5) == BASE_COPY:
      copies.setdefault(ours, {})[layer] = (key, x)
      continue
    g = groups.setdefault(ours, {"module": module, "layers": {}})
    g["layers"].setdefault(layer, {})[m.group(5)] = x

  present = {p: l for p, l in _leaves(params).items()}
  _check_base_copies(path, copies, present)
  new = {}
  for ours, g in groups.items():
    if ours not in present:
      raise ValueError(f"{path}: adapter for {ours}, which params lack; kernels: {sorted(present)}")
    leaf = present[ours]
    base = leaf.frozen_base() if is_adapter(leaf) and not isinstance(leaf, QuantizedWeight) else leaf
    stacked = (base.codes.ndim - 2 if isinstance(base, QuantizedWeight) else base.ndim - 2) > 0
    if stacked:
      n = base.codes.shape[0] if isinstance(base, QuantizedWeight) else base.shape[0]
      if sorted(g["layers"]) != list(range(n)):
        raise ValueError(f"{path}: {ours} has adapters for layers {sorted(g['layers'])}, the model has {n}")
      layers = [g["layers"][i] for i in range(n)]
    else:
      layers = [g["layers"][None]]
    new[ours] = cls.from_hf(base, layers, config, g["module"], stacked, **extra)
  return map_with_path(lambda p, l: new.get(p, l), params, is_leaf=is_adapter)


def _check_base_copies(path: str, copies: dict, present: dict) -> None:
  """PEFT saves a copy of a targeted layer's base weight (`*.base_layer.weight`, e.g. for lm_head with
  `save_embedding_layers`). The adapter belongs on that base: it must equal the base it is imported onto."""
  for ours, layers in copies.items():
    if ours not in present:
      raise ValueError(f"{path}: base weight for {ours}, which params lack; kernels: {sorted(present)}")
    leaf = present[ours]
    base = leaf.frozen_base() if is_adapter(leaf) and not isinstance(leaf, QuantizedWeight) else leaf
    if isinstance(base, QuantizedWeight):
      raise ValueError(f"{path}: {layers[next(iter(layers))][0]} is a float base weight and {ours} is "
                       "quantised here: import onto the float base")
    base = np.asarray(jax.device_get(base), np.float32)
    for layer, (key, x) in layers.items():
      want = base if layer is None else base[layer]
      if want.shape != x.T.shape or not np.allclose(want, x.T, rtol=1e-6, atol=1e-6):
        raise ValueError(f"{path}: {key} (PEFT's copy of the base weight) differs from {ours} of the params "
                         "it is imported onto: load it on the base it was trained on")


def _leaves(params) -> dict[str, Any]:
  out = {}
  map_with_path(lambda p, l: out.setdefault(p, l), params, is_leaf=is_adapter)
  return out
