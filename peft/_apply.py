"""Adapters as pure parameter transforms: pick kernels by path, wrap them in adapter nodes.

    params = peft.apply(params, {("q_proj", "v_proj"): peft.AdapterSpec("lora", rank=8, alpha=16)}, rng)
    params = peft.apply(params, {r"layers/mlp/.*/kernel": peft.AdapterSpec("dora", rank=4)}, rng)
    params = peft.apply_config(params, config.peft, rng)     # what the trainer does
    trainable, frozen = peft.split(params)                    # only adapter parts are trainable

A spec maps targets to an `AdapterSpec`; the first target that matches a kernel's '/' path wins. A target is

  * an HF PEFT `target_modules` name: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    `down_proj`, `lm_head` (also `self_attn.q_proj`, `mlp.down_proj`);
  * `all-linear`: every projection kernel except `lm_head` (PEFT's meaning);
  * otherwise a regex matched in full against the '/' path of the kernel (`layers/attn/(q|v)_proj/kernel`).

A target that matches nothing, or an unknown method or init name, raises at once listing what exists.

Methods are registered by name (`@register_adapter("lora")`); a factory `fn(base, spec, rng, path)` takes the
frozen base (an array [..., in, out], leading axes = stacked layers, or a `QuantizedWeight`) and returns the
adapter node. Initialisations (`init="default" | "gaussian" | "pissa" | "pissa_niter_<k>" | "olora"`) live in
`peft/_init.py`.

Adapter dropout (PEFT drops the input of the adapter path) needs randomness that `dot(x, w)` does not take:
`with_dropout_rng(params, rng)` stores a fresh key per adapter node (per layer for stacked nodes, [..., 2])
and the node's `dot` draws its mask from it. Nodes without a key (eval, the reference model) do not drop.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections

from peft._core import Adapter, is_adapter, map_with_path

Params = Any
AdapterFactory = Callable[..., Adapter]
_ADAPTERS: dict[str, AdapterFactory] = {}


# ---------------------------------------------------------------------------------------------------
# Node helpers
# ---------------------------------------------------------------------------------------------------
def static_field(**kw):
  """A field that is tree structure (rank, scale, dropout rate...), not a leaf."""
  return flax.struct.field(pytree_node=False, **kw)


def adapter_node(cls):
  """`flax.struct.dataclass` for adapter nodes.

  `peft.split` replaces every non-trainable field by None, static metadata included; metadata is tree
  structure rather than a value, so such a None is dropped here instead of stored (else the trainable and
  frozen trees would disagree on their structure).
  """
  cls = flax.struct.dataclass(cls)
  static = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("pytree_node", True)}

  def replace(self, **updates):
    return dataclasses.replace(self, **{k: v for k, v in updates.items() if not (k in static and v is None)})

  cls.replace = replace
  return cls


def input_dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout of the adapter path's input; identity without a key (eval) or at rate 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Specs and the registry
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """What to put on a matched kernel. `options` holds method-specific settings (e.g. IA3's
  `feedforward`)."""
  method: str = "lora"
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  init: str = "default"
  use_rslora: bool = False          # s = alpha / sqrt(r) instead of alpha / r
  dtype: str = "float32"            # of the trainable parts (PEFT keeps adapters in float32)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def replace(self, **kw) -> "AdapterSpec":
    return dataclasses.replace(self, **kw)


def register_adapter(name: str):
  """Registers `fn(base, spec, rng, path) -> Adapter` under `name` (what `config.peft.method` names)."""
  def deco(fn):
    if name in _ADAPTERS:
      raise ValueError(f"adapter {name!r} registered twice")
    _ADAPTERS[name] = fn
    return fn
  return deco


def get_adapter(name: str) -> AdapterFactory:
  if name not in _ADAPTERS:
    raise ValueError(f"unknown adapter method {name!r}; valid: {', '.join(adapter_names())}")
  return _ADAPTERS[name]


def adapter_names() -> list[str]:
  return sorted(_ADAPTERS)


# HF PEFT formats: node classes that `export_adapter` / `import_adapter` can write and read. A class sets
# `hf_peft_type`, `hf_tensors(self)` (one unstacked node -> {suffix: torch-layout array}),
# `hf_config(cls, nodes, spec)` (the adapter_config.json fields) and `from_hf(cls, base, layers, config,
# module)`, plus `hf_accepts(cls, config)` to choose between classes of one peft_type (LoRA vs DoRA).
HF_FORMATS: dict[str, list[type]] = {}


def register_hf_format(cls):
  HF_FORMATS.setdefault(cls.hf_peft_type, []).append(cls)
  return cls


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------
# HF module names -> our kernel paths (see models/_decoder.py).
HF_MODULES = {
    "q_proj": "layers/attn/q_proj/kernel", "k_proj": "layers/attn/k_proj/kernel",
    "v_proj": "layers/attn/v_proj/kernel", "o_proj": "layers/attn/o_proj/kernel",
    "gate_proj": "layers/mlp/gate_proj/kernel", "up_proj": "layers/mlp/up_proj/kernel",
    "down_proj": "layers/mlp/down_proj/kernel", "lm_head": "lm_head/kernel",
}
_HF_PARENTS = {"self_attn": "attn", "mlp": "mlp"}
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def target_regex(target: str) -> str:
  """One target (HF module name, 'all-linear' or a regex) -> a regex over kernel paths."""
  if target == "all-linear":
    return r"(?!lm_head/).*/kernel"
  if _NAME.fullmatch(target):
    parts = target.split(".")
    parts = [_HF_PARENTS.get(p, p) for p in parts[:-1]] + parts[-1:]
    return r"(.*/)?" + re.escape("/".join(parts)) + r"/kernel"
  return target


def kernel_paths(params: Params) -> list[str]:
  """Paths of the leaves adapters can wrap: arrays of rank >= 2 ending in '/kernel', and existing nodes."""
  out = []
  def visit(path, leaf):
    if is_adapter(leaf) or (getattr(leaf, "ndim", 0) >= 2 and path.endswith("/kernel")):
      out.append(path)
    return leaf
  map_with_path(visit, params, is_leaf=is_adapter)
  return out


def _as_targets(key) -> tuple[str, ...]:
  if isinstance(key, str):
    return tuple(t.strip() for t in key.split(",") if t.strip()) if _is_name_list(key) else (key,)
  return tuple(key)


def _is_name_list(s: str) -> bool:
  """'q_proj,v_proj' (a config string) rather than one regex."""
  return all(_NAME.fullmatch(t.strip()) or t.strip() == "all-linear" for t in s.split(",") if t.strip())


def match_targets(params: Params, spec: Mapping) -> dict[str, AdapterSpec]:
  """{kernel path: spec} for the paths the spec's targets select (first target wins). Raises on a target
  that matches no kernel, listing the kernels and module names that exist."""
  paths = kernel_paths(params)
  rules = []
  for key, s in spec.items():
    for t in _as_targets(key):
      rules.append((t, re.compile(target_regex(t)), s))
  chosen, hits = {}, {t: 0 for t, _, _ in rules}
  for p in paths:
    for t, rx, s in rules:
      if rx.fullmatch(p):
        hits[t] += 1
        chosen.setdefault(p, s)
  missing = [t for t, n in hits.items() if n == 0]
  if missing:
    raise ValueError(f"adapter target(s) {missing} match no kernel; kernels: {paths}; module names: "
                     f"{', '.join(HF_MODULES)}, all-linear")
  return chosen


# ---------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------
def _path_key(rng, path: str):
  return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def apply(params: Params, spec: Mapping[Union[str, Sequence[str]], AdapterSpec],
          rng: Optional[jax.Array] = None) -> Params:
  """Wraps the kernels the spec's targets select in adapter nodes; paths do not move.

  Args:
    params: the model's parameter tree (plain kernels, or `QuantizedWeight`s from `quantize_params`).
    spec: {target or tuple of targets: AdapterSpec}, in priority order.
    rng: key for random initialisations (default PRNGKey(0)); each kernel folds its path in.
  """
  from peft import _init   # pylint: disable=g-import-not-at-top  (registers the inits)
  from peft._quant import QuantizedWeight   # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0) if rng is None else rng
  for s in spec.values():
    get_adapter(s.method)
    _init.get_init(s.init)
    if s.rank <= 0:
      raise ValueError(f"adapter rank must be positive, got {s.rank}")
    if not 0.0 <= s.dropout < 1.0:
      raise ValueError(f"adapter dropout must be in [0, 1), got {s.dropout}")
  chosen = match_targets(params, spec)

  def wrap(path, leaf):
    s = chosen.get(path)
    if s is None:
      return leaf
    if is_adapter(leaf) and not isinstance(leaf, QuantizedWeight):
      raise ValueError(f"{path} already holds a {type(leaf).__name__} adapter; merge or strip it first")
    return get_adapter(s.method)(leaf, s, _path_key(rng, path), path)

  return map_with_path(wrap, params, is_leaf=is_adapter)


def with_dropout_rng(params: Params, rng: Optional[jax.Array]) -> Params:
  """Gives every adapter node with dropout > 0 its own key for this step (per layer when stacked)."""
  if rng is None:
    return params

  def put(path, leaf):
    if not is_adapter(leaf) or getattr(leaf, "dropout", 0.0) == 0.0 or not hasattr(leaf, "rng"):
      return leaf
    lead = leaf.lead_shape
    keys = jax.random.split(_path_key(rng, path), max(math.prod(lead), 1))
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    return leaf.replace(rng=keys.reshape(lead + keys.shape[1:]))

  return map_with_path(put, params, is_leaf=is_adapter)


def residual_to_lora(params: Params, initial: Params) -> Params:
  """PiSSA/OLoRA-style adapters (residual base W_res, factors trained from A0, B0) as plain LoRA on the
  original base: W = W_res + s A0 B0 and rank-2r factors [A | A0], [B ; -B0], since
  W_res + s A B = W + s (A B - A0 B0). The scale stays s (PEFT doubles r and alpha, or multiplies alpha by
  sqrt(2) with rsLoRA). `initial` is the adapted tree before training (e.g. the step-0 params)."""
  from peft._lora import LoRA   # pylint: disable=g-import-not-at-top
  from peft._quant import float_weight, like_base   # pylint: disable=g-import-not-at-top
  init_nodes = {}
  map_with_path(lambda p, l: init_nodes.setdefault(p, l), initial, is_leaf=is_adapter)

  def convert(path, node):
    if not is_adapter(node) or not hasattr(node, "a"):
      return node
    if type(node) is not LoRA:
      raise ValueError(f"{path}: residual_to_lora converts plain LoRA nodes, got {type(node).__name__}")
    a0, b0 = init_nodes[path].a, init_nodes[path].b
    w = float_weight(node.base, jnp.float32) + node.scale * jnp.einsum(
        "...ir,...ro->...io", a0.astype(jnp.float32), b0.astype(jnp.float32))
    return node.replace(base=like_base(node.base, w), a=jnp.concatenate([node.a, a0], -1),
                        b=jnp.concatenate([node.b, -b0], -2))

  return map_with_path(convert, params, is_leaf=is_adapter)


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
def default_config() -> ml_collections.ConfigDict:
  """`config.peft`: which adapter, where, and how the frozen base is stored."""
  c = ml_collections.ConfigDict()
  c.method = ml_collections.config_dict.placeholder(str)  # None: full fine-tuning; else lora | dora | ia3
  c.targets = "q_proj,v_proj"          # HF module names, "all-linear", or one '/'-path regex
  c.rank = 8                           # r
  c.alpha = 8.0                        # lora_alpha; scale s = alpha / r
  c.use_rslora = False                 # s = alpha / sqrt(r) (rsLoRA)
  c.dropout = 0.0                      # dropout on the adapter path's input (needs with_dropout_rng per step)
  c.init = "default"                   # default (Kaiming-uniform A, B = 0) | gaussian | pissa |
                                       # pissa_niter_<k> (randomised SVD, k iterations) | olora
  c.dtype = "float32"                  # of the trainable adapter parts
  c.quantize = ml_collections.config_dict.placeholder(str)  # None | nf4 | int8: storage of the frozen base
  c.quant_block_size = 64              # values per absmax scale
  c.quantize_targets = "all-linear"    # which kernels get quantised storage (bitsandbytes: all but lm_head)
  c.options = ml_collections.ConfigDict()  # method-specific, e.g. options.feedforward = "down_proj" (ia3)
  return c


def spec_from_config(cfg) -> AdapterSpec:
  return AdapterSpec(method=cfg.method, rank=int(cfg.get("rank", 8)), alpha=float(cfg.get("alpha", 8.0)),
                     dropout=float(cfg.get("dropout", 0.0)), init=cfg.get("init", "default") or "default",
                     use_rslora=bool(cfg.get("use_rslora", False)), dtype=cfg.get("dtype", "float32"),
                     options=dict(cfg.get("options", None) or {}))


def check_config(cfg) -> None:
  """Fails at once on an unknown method, init or quantisation, listing the valid names."""
  from peft import _init   # pylint: disable=g-import-not-at-top
  from peft._quant import KINDS   # pylint: disable=g-import-not-at-top
  if cfg is None:
    return
  if cfg.get("method") is not None:
    get_adapter(cfg.method)
    _init.get_init(cfg.get("init", "default") or "default")
  q = cfg.get("quantize")
  if q is not None and q not in KINDS:
    raise ValueError(f"config.peft.quantize={q!r}; valid: None, {', '.join(KINDS)}")
  if q is not None and cfg.get("method") is None:
    raise ValueError("config.peft.quantize needs an adapter method: a quantised base is frozen, so nothing "
                     f"would train; valid methods: {', '.join(adapter_names())}")


def apply_config(params: Params, cfg, rng: Optional[jax.Array] = None) -> Params:
  """`config.peft` -> adapted params; unchanged when cfg is None or cfg.method is None.

  With `quantize`, the `quantize_targets` kernels are quantised first and the adapters wrap the quantised
  bases, so DoRA's magnitude starts from the dequantised base and PiSSA/OLoRA factor the dequantised base
  and re-quantise the residual. (For the QPiSSA order of the paper, SVD of the float weight then
  quantisation of the residual, call `quantize_params(apply(...))` yourself.)
  """
  check_config(cfg)
  if cfg is None or cfg.get("method") is None:
    return params
  from peft._quant import quantize_params   # pylint: disable=g-import-not-at-top
  targets = cfg.get("targets", "q_proj,v_proj")
  targets = _as_targets(targets) if isinstance(targets, str) else tuple(targets)
  if cfg.get("quantize") is not None:
    qt = cfg.get("quantize_targets", "all-linear")
    qt = _as_targets(qt) if isinstance(qt, str) else tuple(qt)
    rxs = [re.compile(target_regex(t)) for t in qt]
    params = quantize_params(params, lambda p: any(rx.fullmatch(p) for rx in rxs), cfg.quantize,
                             int(cfg.get("quant_block_size", 64)))
  return apply(params, {targets: spec_from_config(cfg)}, rng)
