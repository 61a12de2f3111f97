r"""The merge task: merges models given as Hugging Face directories, workdirs of this project's runs or HF PEFT
adapter directories with a registered `merging` method, and writes a Hugging Face directory.

    python main.py --config=configs/merge.py --config.method=ties --config.models=DIR1,DIR2 \
        --config.base=DIR0 --config.params='{"density": 0.5, "weight": [1.0, 0.5]}' --workdir=OUT
    python main.py --config=configs/merge.py --config.mergekit_yaml=merge.yml --workdir=OUT

Inputs (each of `base` and `models`), told apart by their files:
  an HF PEFT adapter directory (adapter_config.json): read onto the base (`peft.import_adapter`); a tree
      method merges base + its delta, a `lora_*` method combines the adapters' factors (all inputs adapters);
  a Hugging Face directory (config.json + safetensors): `models.load_hf`;
  a workdir of a training run: `build.load_trained` (its adapters merged).
When the base and every model are HF directories and the method works tensor by tensor, the merge streams
(`merging.merge_checkpoints`: one tensor of every model in memory at a time); otherwise it runs in memory.

Parameters (`config.params`, JSON): as `merging` takes them: scalars, per-model lists, and dicts of regexes
over our parameter paths (`layers/attn/.*`, `embed/embedding`, ...) -> value, first full match wins. A
mergekit YAML (`merge_method`, `base_model`, `models[].model` + `parameters`, global `parameters`, `dtype`)
is read into the same form; mergekit's filter lists (`- filter: self_attn` / `value: 0.5`, substring of the
HF tensor name, an entry without filter as the default) become regexes over the paths whose HF name holds
the substring; where mergekit's defaults differ from ours, the YAML means mergekit's (`rescale`: its
L1-norm matching for DARE and DELLA).

Vocabularies: embeddings (and an untied head) of different vocabulary sizes are refused, naming the sizes;
with `rectify_embed=True` every model keeps the first min(V) rows, as mergekit's `rectify_embed_sizes`
(0.1.5: `--unsafe-truncate-embeddings`) does: the common leading submatrix, which assumes equal token ids.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import merging
import models
import peft
from train_lib import build

OUR_TO_HF = {   # our parameter path -> HF tensor name ("{i}": layer index of a stacked leaf)
    "embed/embedding": "model.embed_tokens.weight",
    "layers/attn_norm/scale": "model.layers.{i}.input_layernorm.weight",
    "layers/mlp_norm/scale": "model.layers.{i}.post_attention_layernorm.weight",
    "final_norm/scale": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
    **{f"layers/{ours}/{m}/{k}": f"model.layers.{{i}}.{hf}.{m}.{w}"
       for ours, hf, mods in (("attn", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                              ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj")))
       for m in mods for k, w in (("kernel", "weight"), ("bias", "bias"))},
}
VOCAB_AXES = {"embed/embedding": 0, "lm_head/kernel": -1}   # our layout: embedding [V, D], head [D, V]
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "added_tokens", "vocab.", "merges.", "chat_template")
_MERGEKIT_NAMES = {"nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten", "lambda": "lambda_"}
_MERGEKIT_RESCALED = ("dare_linear", "dare_ties", "della", "della_linear")   # mergekit's rescale default True
_MERGEKIT_IGNORED = ("int8_mask",)   # memory options of mergekit without an effect on the result


# =====================================================================================================
# Inputs
# =====================================================================================================
def input_kind(path: str) -> str:
  """'adapter' (HF PEFT), 'hf' (config.json + safetensors) or 'workdir' (a training run)."""
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    return "adapter"
  if any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
    return "hf"
  if os.path.exists(os.path.join(path, build.CONFIG_FILE)):
    return "workdir"
  raise FileNotFoundError(f"{path}: neither an HF PEFT adapter (adapter_config.json), an HF checkpoint "
                          "(model.safetensors[.index.json]) nor a training workdir (config.json + checkpoints)")


def tokenizer_dir(path: str) -> Optional[str]:
  """The directory whose tokenizer files belong to the model at `path` (None: built-in tokenizer)."""
  kind = input_kind(path)
  if kind == "hf":
    return path
  if kind == "workdir":
    tok = build.load_config(path).data.get("tokenizer")
    return tok if tok and os.path.isdir(tok) else None
  return None


def load_model(path: str):
  """(DecoderConfig, plain params as host arrays, model_type) of an HF directory or a training workdir."""
  kind = input_kind(path)
  if kind == "hf":
    cfg, params = models.load_hf(path)
    with open(os.path.join(path, "config.json")) as f:
      model_type = json.load(f).get("model_type", "llama")
    return cfg, params, model_type
  if kind == "workdir":
    _, model, params, _ = build.load_trained(path)
    params = {k: v for k, v in peft.merge(params).items() if k != build.LOSS_PARAMS}
    return model.config, jax.device_get(params), None
  raise ValueError(f"{path} is an adapter directory: it needs a base (config.base)")


def load_adapter(path: str, base_params):
  """The base params with the adapter of `path` on their kernels (HF PEFT directory)."""
  return peft.import_adapter(path, base_params)


def adapter_nodes(params) -> dict[str, Any]:
  out = {}
  peft.map_with_path(lambda p, l: out.setdefault(p, l) if peft.is_adapter(l) else l, params,
                     is_leaf=peft.is_adapter)
  return {p: l for p, l in out.items() if peft.is_adapter(l)}


# =====================================================================================================
# Parameters: JSON, mergekit YAML, paths
# =====================================================================================================
def hf_name(path: str) -> str:
  """Our path -> its HF tensor name (the layer index left as '{i}'); unknown paths map to themselves."""
  return OUR_TO_HF.get(path, path)


def our_path(name: str) -> str:
  """An HF tensor name -> our path (layer index dropped); unknown names map to themselves."""
  generic = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", name)
  for ours, hf in OUR_TO_HF.items():
    if hf == generic:
      return ours
  return name


def filter_regex(substring: Optional[str], paths) -> Optional[str]:
  """mergekit's filter (a substring of the HF tensor name; None or '*': every tensor) as a regex over our
  paths: the alternation of the paths whose HF name holds it; None when no path does."""
  if substring is None or substring == "*":
    return ".*"
  hits = [re.escape(p) for p in paths if substring in hf_name(p) or substring in p]
  return "|".join(hits) if hits else None


def from_mergekit_setting(value, paths, name: str):
  """A mergekit parameter value -> ours: scalars as they are, filter lists -> regex dicts."""
  if isinstance(value, list):
    if value and all(isinstance(v, (int, float, bool, str)) for v in value):
      if len(value) == 1:
        return value[0]
      raise ValueError(f"mergekit parameter {name}={value}: per-layer gradients are not supported; give one "
                       "value per tensor group with filters")
    rules = {}
    for cond in value:
      if not isinstance(cond, dict) or "value" not in cond:
        raise ValueError(f"mergekit parameter {name}: expected a list of {{filter, value}}, got {cond!r}")
      rx = filter_regex(cond.get("filter"), paths)
      if rx is not None and rx not in rules:
        rules[rx] = from_mergekit_setting(cond["value"], paths, name)
    if ".*" not in rules:
      rules[".*"] = None    # mergekit: a tensor no filter matches gets the parameter's default
    return rules
  if isinstance(value, dict) and "value" in value:
    return from_mergekit_setting([value], paths, name)
  return value


def read_mergekit_yaml(file: str) -> dict:
  """The YAML as a dict with `method`, `base`, `models`, `model_params` (one dict per model), `params`
  (global) and `dtype`; filters are resolved later against the parameter paths (`mergekit_params`)."""
  import yaml   # pylint: disable=g-import-not-at-top
  with open(file) as f:
    y = yaml.safe_load(f)
  for key in ("slices", "modules"):
    if y.get(key):
      raise ValueError(f"{file}: mergekit `{key}` (layer ranges, passthrough) is not supported")
  if y.get("merge_method") not in merging.names():
    raise ValueError(f"{file}: merge_method {y.get('merge_method')!r} is not a method here; valid: "
                     f"{', '.join(merging.names())}")
  entries = y.get("models") or []
  names = [e["model"] if isinstance(e, dict) else e for e in entries]
  return dict(method=y["merge_method"], base=y.get("base_model") or "", models=names,
              model_params=[dict((e.get("parameters") or {}) if isinstance(e, dict) else {}) for e in entries],
              params=dict(y.get("parameters") or {}), dtype=y.get("dtype") or "")


def mergekit_params(spec: dict, paths) -> dict:
  """Our parameters for `merging.get(spec['method'])` from a read mergekit YAML (`read_mergekit_yaml`)."""
  method = merging.get(spec["method"])
  defaults = method.defaults

  def ours(k):
    return _MERGEKIT_NAMES.get(k, k)

  out = {}
  for k, v in spec["params"].items():
    if k in _MERGEKIT_IGNORED:
      continue
    out[ours(k)] = from_mergekit_setting(v, paths, k)
  per_model = {ours(k) for mp in spec["model_params"] for k in mp} - set(_MERGEKIT_IGNORED)
  for k in per_model:
    if k not in method.per_model:
      raise ValueError(f"{method.name}: mergekit parameter {k!r} is given per model, but it is one value "
                       f"for all models here (per-model: {method.per_model})")
    fallback = out.get(k, defaults.get(k))
    values = []
    for mp in spec["model_params"]:
      raw = {ours(a): b for a, b in mp.items()}
      values.append(from_mergekit_setting(raw[k], paths, k) if k in raw else fallback)
    out[k] = values
  if "rescale" in defaults:
    rescale = out.pop("rescale", method.name in _MERGEKIT_RESCALED)
    out["rescale"] = "norm" if rescale in (True, "norm") else (None if rescale in (False, None) else rescale)
  return _fill_defaults(out, defaults)


def _fill_defaults(value, defaults, key=None):
  """Replaces the None that stands for 'the default' inside regex dicts and lists by the method's default."""
  if isinstance(value, dict) and key is None:
    return {k: _fill_defaults(v, defaults, k) for k, v in value.items()}
  if isinstance(value, dict):
    return {rx: _fill_defaults(v, defaults, key) for rx, v in value.items()}
  if isinstance(value, list):
    return [_fill_defaults(v, defaults, key) for v in value]
  if value is None and key is not None and key in defaults and key != "rescale":
    return defaults[key]
  return value


def to_hf_names(value, names):
  """Regex dicts over our paths -> exact dicts over the HF tensor `names` (for streaming merges)."""
  if isinstance(value, dict):
    return {re.escape(n): to_hf_names(merging.resolve(value, our_path(n)), names) for n in names}
  if isinstance(value, list):
    return [to_hf_names(v, names) for v in value]
  return value


# =====================================================================================================
# Vocabularies
# =====================================================================================================
def check_vocab(trees: list, labels: list[str], rectify: bool) -> list:
  """Equal vocabulary sizes, or (rectify) every tree cut to the common leading rows of its embedding and
  head, as mergekit's rectify_embed_sizes. Raises naming the sizes otherwise."""
  sizes = [np.shape(t["embed"]["embedding"])[0] for t in trees]
  if len(set(sizes)) == 1:
    return trees
  if not rectify:
    i = next(j for j, s in enumerate(sizes) if s != sizes[0])
    raise ValueError(f"vocabulary sizes differ: {labels[0]} has {sizes[0]} embedding rows, {labels[i]} has "
                     f"{sizes[i]} (all: {dict(zip(labels, sizes))}); resize them, or pass "
                     f"--config.rectify_embed=True to keep the first {min(sizes)} rows of every model "
                     "(mergekit's rectify_embed; assumes the same token ids)")
  v = min(sizes)
  out = []
  for t in trees:
    t = dict(t)
    for path, axis in VOCAB_AXES.items():
      top, leaf = path.split("/")
      if top in t:
        x = t[top][leaf]
        idx = [slice(None)] * np.ndim(x)
        idx[axis] = slice(0, v)
        t[top] = {**t[top], leaf: x[tuple(idx)]}
    out.append(t)
  return out


# =====================================================================================================
# The task
# =====================================================================================================
def _split(s) -> list[str]:
  if isinstance(s, (list, tuple)):
    return [str(x) for x in s]
  return [x.strip() for x in str(s or "").split(",") if x.strip()]


def resolve_inputs(config) -> dict:
  """method, base, models, params (raw: JSON or a read YAML) and dtype from the config."""
  if config.get("mergekit_yaml"):
    spec = read_mergekit_yaml(config.mergekit_yaml)
    here = os.path.dirname(os.path.abspath(config.mergekit_yaml))
    fix = lambda p: p if not p or os.path.isabs(p) or os.path.exists(p) else os.path.join(here, p)
    base = fix(spec["base"])
    names = [fix(m) for m in spec["models"]]
    if base and merging.get(spec["method"]).base != "unused" and base in names:   # mergekit: the base's own
      keep = [i for i, n in enumerate(names) if n != base]                        # task vector is zero
      names, spec["model_params"] = [names[i] for i in keep], [spec["model_params"][i] for i in keep]
    return dict(method=spec["method"], base=base, models=names, yaml=spec,
                params=None, dtype=config.get("dtype") or spec["dtype"])
  params = config.get("params") or {}
  if isinstance(params, str):
    params = json.loads(params) if params.strip() else {}
  elif hasattr(params, "to_dict"):
    params = params.to_dict()
  if not config.get("method"):
    raise ValueError("config.method is empty (a merging method; valid: " + ", ".join(merging.names()) + ")")
  return dict(method=config.method, base=config.get("base") or "", models=_split(config.get("models")),
              yaml=None, params=dict(params), dtype=config.get("dtype") or "")


def _params_for(inp, paths) -> dict:
  return mergekit_params(inp["yaml"], paths) if inp["yaml"] is not None else dict(inp["params"])


def merge(config, workdir: str) -> str:
  """Merges per `config` (module docstring) and writes the HF directory `workdir`; returns it."""
  inp = resolve_inputs(config)
  method = merging.get(inp["method"])
  names, base_dir = inp["models"], inp["base"]
  if not names:
    raise ValueError("config.models is empty: give the directories to merge, comma-separated")
  if method.base == "required" and not base_dir:
    raise ValueError(f"{method.name} needs a base: set config.base (or base_model in the YAML)")
  for name in method.tensor_params:       # fail before loading anything
    method.estimator(name)
  seed = int(config.get("seed", 0))
  kinds = [input_kind(d) for d in names]
  base_kind = input_kind(base_dir) if base_dir else None
  os.makedirs(workdir, exist_ok=True)
  record = {"method": method.name, "base": base_dir, "models": names, "kinds": kinds, "seed": seed}

  streams = (method.kind == "tensor" and all(k == "hf" for k in kinds) and base_kind in (None, "hf")
             and not inp["dtype"] and config.get("streaming", True) and not method.tensor_params)
  if streams:
    ref_dir = base_dir if base_dir and method.base != "unused" else names[0]
    vocab = set()
    for d in ([base_dir] if base_dir else []) + names:
      vocab.add(_hf_config(d).get("vocab_size"))
    streams = len(vocab) == 1
  if streams:
    hf_names = _hf_tensor_names(ref_dir)
    params = {k: to_hf_names(v, hf_names)
              for k, v in _params_for(inp, sorted({our_path(n) for n in hf_names})).items()}
    _clear_weights(workdir)
    merging.merge_checkpoints(method, base_dir or None, names, workdir, seed=seed, **params)
    record.update(streaming=True, params=_jsonable(params))
  else:
    record.update(streaming=False, **_merge_in_memory(config, inp, method, names, kinds, base_dir, base_kind,
                                                       seed, workdir))
  tok_src = base_dir if base_dir else (names[0] if kinds[0] != "adapter" else None)
  tok = tokenizer_dir(tok_src) if tok_src else None
  if tok and os.path.abspath(tok) != os.path.abspath(workdir):
    for f in os.listdir(tok):
      if f.startswith(_TOKENIZER_PREFIXES) or f.endswith(".model"):
        shutil.copy(os.path.join(tok, f), workdir)
  with open(os.path.join(workdir, "merge.json"), "w") as f:
    json.dump(record, f, indent=2)
  print(f"merged {len(names)} model(s) with {method.name} "
        f"({'streaming' if record['streaming'] else 'in memory'}) into {workdir}", flush=True)
  return workdir


def _merge_in_memory(config, inp, method, names, kinds, base_dir, base_kind, seed, workdir) -> dict:
  base_cfg, base, model_type = (load_model(base_dir) if base_dir else (None, None, None))
  if method.kind == "lora":
    if base is None or any(k != "adapter" for k in kinds):
      raise ValueError(f"{method.name} combines LoRA adapters: every model must be an HF PEFT adapter "
                       f"directory and config.base their base model (got {dict(zip(names, kinds))})")
    loras = [adapter_nodes(load_adapter(d, base)) for d in names]
    paths = sorted(loras[0])
    params = _params_for(inp, paths)
    combined = method(loras, **params)
    flat = merging.flatten(base)
    for p, (a, b) in combined.items():
      w = flat[p]
      flat[p] = (jnp.asarray(w, jnp.float32) + jnp.einsum("...ir,...ro->...io", a, b)).astype(w.dtype)
    merged, cfg = merging.unflatten(flat), base_cfg
  else:
    trees, cfgs, labels = [], [], []
    for d, k in zip(names, kinds):
      if k == "adapter":
        if base is None:
          raise ValueError(f"{d} is an adapter directory: set config.base to its base model")
        trees.append(peft.merge(load_adapter(d, base)))
        cfgs.append(base_cfg)
      else:
        c, t, mt = load_model(d)
        trees.append(t)
        cfgs.append(c)
        model_type = model_type or mt
      labels.append(d)
    use_base = base is not None and method.base != "unused"
    all_trees = check_vocab(([base] if base is not None else []) + trees,
                            ([base_dir] if base is not None else []) + labels, bool(config.get("rectify_embed")))
    if base is not None:
      base, trees = all_trees[0], all_trees[1:]
    else:
      trees = all_trees
    ref_cfg = base_cfg if base_cfg is not None else cfgs[0]
    cfg = ref_cfg.replace(vocab_size=int(np.shape(trees[0]["embed"]["embedding"])[0]))
    params = _params_for(inp, sorted(merging.flatten(trees[0])))
    if method.tensor_params:
      tok_src = base_dir if base_dir else next((d for d, k in zip(names, kinds) if k != "adapter"), None)
      params.update(estimate_tensor_params(config, method, ref_cfg, trees, tok_src, seed))
    merged = method(base if use_base else None, trees, seed=seed, **params)
  models.save_hf(workdir, cfg, jax.device_get(merged), model_type=config.get("model_type") or model_type or "llama",
                 dtype=inp["dtype"] or None)
  return {"params": _jsonable(params)}


def sampled_log_prob(model):
  """(params, batch, rng) -> [B]: log p(y|x) summed over the batch's loss positions, each label y sampled
  from the model's own next-token distribution given the data's prefix (so that E[(grad)^2] is the
  model's Fisher, not the empirical Fisher of the data's labels)."""
  def fn(params, batch, rng):
    logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    y = jax.lax.stop_gradient(jax.random.categorical(rng, logits))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
    return jnp.sum(logp * batch["loss_mask"], axis=-1)
  return fn


def calibration_batches(config, tok_src: Optional[str]) -> list[dict]:
  """`config.calibration.num_batches` batches of `config.data` (its tokenizer, else the models')."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  c = config.calibration
  if config.data.get("tokenizer") or config.data.get("source", "builtin") == "builtin":
    tok = data_lib.get_tokenizer(config.data)
  else:
    found = tokenizer_dir(tok_src) if tok_src else None
    if found is None:
      raise ValueError("the calibration data needs a tokenizer: set config.data.tokenizer (no tokenizer "
                       "files beside the models)")
    tok = data_lib.load_tokenizer(found)
  ds = data_lib.get_dataset(config.data, "train", tokenizer=tok, batch_size=int(c.batch_size),
                            seq_len=int(c.seq_len), seed=int(config.get("seed", 0)))
  it = iter(ds)
  keys = ("inputs", "positions", "segment_ids", "loss_mask")
  return [{k: jnp.asarray(b[k]) for k in keys} for b in (next(it) for _ in range(int(c.num_batches)))]


def estimate_tensor_params(config, method, cfg, trees, tok_src, seed) -> dict:
  """The per-model tensors `method` needs (its registered estimators), each model on the same batches."""
  batches = calibration_batches(config, tok_src)
  fn = sampled_log_prob(models.Decoder(cfg))
  out = {}
  for name in method.tensor_params:
    estimate = method.estimator(name)
    out[name] = [estimate(fn, jax.tree.map(jnp.asarray, t), batches,
                          jax.random.fold_in(jax.random.PRNGKey(seed), i)) for i, t in enumerate(trees)]
  return out


def _hf_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _hf_tensor_names(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return list(json.load(f)["weight_map"])
  from safetensors import safe_open   # pylint: disable=g-import-not-at-top
  with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
    return list(f.keys())


def _clear_weights(path: str):
  for f in os.listdir(path):
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
      os.remove(os.path.join(path, f))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)
