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

import math
import re
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections

from peft import _init
from peft._core import is_adapter, map_with_path
from peft._data_init import data_init_defaults
from peft._lora import LoRA
from peft._node import AdapterSpec, get_adapter, adapter_names
from peft._quant import KINDS, QuantizedWeight, float_weight, like_base, quantize_params
from peft._targets import as_targets, match_targets, target_regex

Params = Any


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
  rng = jax.random.PRNGKey(0) if rng is None else rng
  for s in spec.values():
    get_adapter(s.method)
    _init.get_init(s.init)
    if s.rank <= 0:
      raise ValueError(f"adapter rank must be positive, got {s.rank}")
    if not 0.0 <= s.dropout < 1.0:
      raise ValueError(f"adapter dropout must be in [0, 1), got {s.dropout}")
  chosen = _prepare(params, match_targets(params, spec))

  def wrap(path, leaf):
    s = chosen.get(path)
    if s is None:
      return leaf
    if is_adapter(leaf) and not isinstance(leaf, QuantizedWeight):
      raise ValueError(f"{path} already holds a {type(leaf).__name__} adapter; merge or strip it first")
    return get_adapter(s.method)(leaf, s, _path_key(rng, path), path)

  return map_with_path(wrap, params, is_leaf=is_adapter)


def _prepare(params: Params, chosen: dict) -> dict:
  """A factory with a `prepare(spec, {path: leaf}) -> spec` attribute sees all the kernels one spec targets
  before any is wrapped: nodes that share state across targets (VeRA's random basis, sized for the largest
  targeted layer) read it from the returned spec's options."""
  groups: dict[int, tuple] = {}
  for p, s in chosen.items():
    groups.setdefault(id(s), (s, []))[1].append(p)
  leaves = {}
  map_with_path(lambda p, l: leaves.setdefault(p, l), params, is_leaf=is_adapter)
  out = {}
  for s, paths in groups.values():
    prepare = getattr(get_adapter(s.method), "prepare", None)
    s = prepare(s, {p: leaves[p] for p in paths}) if prepare is not None else s
    out.update({p: s for p in paths})
  return out


def with_dropout_rng(params: Params, rng: Optional[jax.Array]) -> Params:
  """Gives every adapter node with dropout > 0 its own key for this step (per layer when stacked), and
  every node with a `with_step_rng(rng)` method the step key itself (DyLoRA draws its rank from it)."""
  if rng is None:
    return params

  def put(path, leaf):
    if is_adapter(leaf) and hasattr(leaf, "with_step_rng"):   # a draw shared by all nodes (DyLoRA's rank)
      leaf = leaf.with_step_rng(rng)
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
  """`config.peft`: which adapter, where, and how the frozen base is stored. The adapter's own settings
  (rank, alpha, ...) take their defaults from `AdapterSpec`, their one home."""
  spec = AdapterSpec()
  c = ml_collections.ConfigDict()
  c.method = ml_collections.config_dict.placeholder(str)  # None: full fine-tuning; else lora | dora | ia3
  c.targets = "q_proj,v_proj"          # HF module names, "all-linear", or one '/'-path regex
  c.rank = spec.rank                   # r
  c.alpha = spec.alpha                 # lora_alpha; scale s = alpha / r
  c.use_rslora = spec.use_rslora       # s = alpha / sqrt(r) (rsLoRA)
  c.dropout = spec.dropout             # dropout on the adapter path's input (needs with_dropout_rng per step)
  c.init = spec.init                   # default (Kaiming-uniform A, B = 0) | gaussian | pissa |
                                       # pissa_niter_<k> (randomised SVD, k iterations) | olora | eva | lora_ga
                                       # | any `peft.data_init_names()`
  # a data-driven init's calibration, run by the trainer's `data_init` host hook before step 0: `batches`
  # and each registered init's options (their defaults are the `register_data_init` calls')
  c.data_init = ml_collections.ConfigDict(data_init_defaults())
  c.dtype = spec.dtype                 # of the trainable adapter parts
  c.quantize = ml_collections.config_dict.placeholder(str)  # None | nf4 | int8: storage of the frozen base
  c.quant_block_size = 64              # values per absmax scale
  c.quantize_targets = "all-linear"    # which kernels get quantised storage (bitsandbytes: all but lm_head)
  c.options = ml_collections.ConfigDict()  # method-specific, e.g. options.feedforward = "down_proj" (ia3)
  return c


_SPEC_FIELDS = ("rank", "alpha", "dropout", "init", "use_rslora", "dtype")


def spec_from_config(cfg) -> AdapterSpec:
  """The `AdapterSpec` of `config.peft`; fields the config leaves out keep `AdapterSpec`'s defaults."""
  given = {k: cfg.get(k) for k in _SPEC_FIELDS if cfg.get(k) is not None}
  return AdapterSpec(method=cfg.method, options=dict(cfg.get("options", None) or {}), **given)


def check_config(cfg) -> None:
  """Fails at once on an unknown method, init or quantisation, listing the valid names."""
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
  targets = cfg.get("targets", "q_proj,v_proj")
  targets = as_targets(targets) if isinstance(targets, str) else tuple(targets)
  if cfg.get("quantize") is not None:
    qt = cfg.get("quantize_targets", "all-linear")
    qt = as_targets(qt) if isinstance(qt, str) else tuple(qt)
    rxs = [re.compile(target_regex(t)) for t in qt]
    params = quantize_params(params, lambda p: any(rx.fullmatch(p) for rx in rxs), cfg.quantize,
                             int(cfg.get("quant_block_size", 64)))
  return apply(params, {targets: spec_from_config(cfg)}, rng)
