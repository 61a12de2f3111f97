r"""TempBalance and Model Balancing: layerwise learning rates (or weight decays) from HT-SR alpha.

A layer whose ESD has a large power-law exponent alpha is read as under-trained and gets a larger step; a
small alpha, a smaller one. Every `esd_interval` steps the host fits alpha per matrix
(`diagnostics.analyze`), maps it to a multiplier f, and writes f into the optimizer state:

    u <- u * f        (after `scale_by_learning_rate`: lr_i = eta_t * f_i, decoupled decay included)

Mappings, with alpha the per-layer (or per-block mean) exponents and n their count (the f below multiply the
scheduled base rate eta_t):

  tb_linear_map    s1 + (s2 - s1) (alpha - min alpha) / (max alpha - min alpha)         s1=0.5, s2=1.5
  linear_map       the same with s1 = lr_min_ratio, s2 = lr_min_ratio + lr_slope        (0.5, 1.0)
  tb_sqrt          n sqrt(alpha) / sum sqrt(alpha)
  tb_log2          n log2(alpha) / sum log2(alpha)
  tb_step / rank   s1 + (s2 - s1) rank(alpha) / n                                      (rank 0 = smallest)
  sigmoid          10^c,  c = s_max (sig(T d) - 1/2) if d > 0 else s_min (sig(T d) - 1/2),  d = alpha - mean
                   s_min=2, s_max=1, T=10, so f lies in (10^(-s_min/2), 10^(s_max/2))
  tb_std_sigmoid   `sigmoid` applied per layer (the name of Model Balancing's SciML runs)

`granularity='block'` maps the mean alpha of each decoder block (Model Balancing `tb_layer_blocks`, the
GLUE headline with `sigmoid`) and every leaf of the block, norms and biases included, takes its block's f;
`block_unit='layer'` further spreads the block's range linearly over its matrices. `granularity='layer'`
maps each matrix (TempBalance) and the other leaves of its module (its bias) follow it. Leaves with no ESD
keep f = 1. `normalize=True` (`tb_lr_normalize`) rescales f to mean 1. Model Balancing's `tb_layer_groups`
interpolates against a reversed range (higher alpha, lower rate); that mode is deliberately not offered.

The multipliers are traced optimizer state of fixed shapes (per leaf: () or, for stacked `[L, ...]` leaves,
[L] broadcast over each slice), so `refresh_multipliers` never recompiles the jitted step:

    tx = peft.tempbalance(optax.adamw(schedule, weight_decay=0.1))
    opt_state = tx.init(params)
    ...
    if step % esd_interval == 0:
      opt_state = peft.refresh_multipliers(opt_state, params, peft.TempBalanceConfig.tempbalance())

With `hyperparam='wd'` the multipliers go into `add_layerwise_decayed_weights` instead (its own state);
`'hybrid'` writes both. With adapters, alpha is measured on W0 + s BA (`esd.esd_type='full'`) and f scales
the adapter leaves' updates (their paths extend the kernel's path). With GaLore the transform scales the
back-projected update, since it comes last in the chain.

References: Zhou, Pang, Liu, Martin, Mahoney, Yang, "Temperature Balancing, Layer-wise Weight Analysis, and
Neural Network Training", NeurIPS 2023; Liu, Hu, Pang, Zhou, Ren, Yang, "Model Balancing Helps Low-data
Training and Fine-tuning", EMNLP 2024.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diagnostics
import hooks
import peft
from peft import path_str

Params = Any


# ---------------------------------------------------------------------------------------------------
# Mappings alpha -> multiplier (numpy or jnp arrays)
# ---------------------------------------------------------------------------------------------------
def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def tb_linear_map(alphas, s1: float = 0.5, s2: float = 1.5):
  """Linear from s1 at the smallest alpha to s2 at the largest; all equal gives (s1 + s2) / 2."""
  xp = _xp(alphas)
  a = xp.asarray(alphas)
  lo, hi = xp.min(a), xp.max(a)
  span = hi - lo
  t = xp.where(span > 0, (a - lo) / xp.where(span > 0, span, 1.0), 0.5)
  return s1 + (s2 - s1) * t


def linear_map(alphas, lr_min_ratio: float = 0.5, lr_slope: float = 1.0):
  """Model Balancing `linear_map`: [lr_min_ratio, lr_min_ratio + lr_slope]."""
  return tb_linear_map(alphas, lr_min_ratio, lr_min_ratio + lr_slope)


def tb_sqrt(alphas):
  xp = _xp(alphas)
  r = xp.sqrt(xp.asarray(alphas))
  return r.shape[-1] * r / xp.sum(r)


def tb_log2(alphas):
  xp = _xp(alphas)
  r = xp.log2(xp.asarray(alphas))
  return r.shape[-1] * r / xp.sum(r)


def tb_step(alphas, s1: float = 0.5, s2: float = 1.5):
  """Rank-based: the k-th smallest alpha (k = 0..n-1) gets s1 + (s2 - s1) k / n; ties keep their order."""
  xp = _xp(alphas)
  a = xp.asarray(alphas)
  order = xp.argsort(a, stable=True) if xp is jnp else np.argsort(a, kind="stable")
  rank = xp.argsort(order, stable=True) if xp is jnp else np.argsort(order, kind="stable")
  return s1 + (s2 - s1) * rank / a.shape[-1]


def rank_map(alphas, lr_min_ratio: float = 0.5, lr_slope: float = 1.0):
  """Model Balancing `rank` / `tbr`: tb_step over [lr_min_ratio, lr_min_ratio + lr_slope]."""
  return tb_step(alphas, lr_min_ratio, lr_min_ratio + lr_slope)


def sigmoid_map(alphas, s_min: float = 2.0, s_max: float = 1.0, temp: float = 10.0):
  """Model Balancing `sigmoid`: 10^(s (sigmoid(T d) - 1/2)), d = alpha - mean, s = s_max above the mean."""
  xp = _xp(alphas)
  a = xp.asarray(alphas)
  d = a - xp.mean(a)
  centred = 1.0 / (1.0 + xp.exp(-temp * d)) - 0.5
  return 10.0 ** (xp.where(d > 0, s_max, s_min) * centred)


tb_std_sigmoid = sigmoid_map


def normalize_mean(f):
  """`tb_lr_normalize`: rescale so that the mean multiplier is 1."""
  xp = _xp(f)
  return f / xp.mean(f)


def _mapping(config: "TempBalanceConfig") -> Callable:
  c = config
  return {
      "tb_linear_map": lambda a: linear_map(a, c.lr_min_ratio, c.lr_slope),
      "linear_map": lambda a: linear_map(a, c.lr_min_ratio, c.lr_slope),
      "tb_sqrt": tb_sqrt,
      "tb_log2": tb_log2,
      "tb_step": lambda a: rank_map(a, c.lr_min_ratio, c.lr_slope),
      "rank": lambda a: rank_map(a, c.lr_min_ratio, c.lr_slope),
      "sigmoid": lambda a: sigmoid_map(a, c.sigmoid_min, c.sigmoid_max, c.exp_temp),
      "tb_std_sigmoid": lambda a: sigmoid_map(a, c.sigmoid_min, c.sigmoid_max, c.exp_temp),
  }[c.assign]


ASSIGN_FUNCS = ("tb_linear_map", "linear_map", "tb_sqrt", "tb_log2", "tb_step", "rank", "sigmoid",
                "tb_std_sigmoid")


@dataclasses.dataclass(frozen=True)
class TempBalanceConfig:
  """Which alpha -> multiplier map, at which granularity, for which hyperparameter."""
  assign: str = "tb_linear_map"          # one of ASSIGN_FUNCS
  granularity: str = "layer"             # layer (per matrix) | block (mean alpha of each decoder block)
  block_unit: str = "block"              # block granularity: block (one f per block) | layer (spread in block)
  lr_min_ratio: float = 0.5              # linear / rank maps: lowest multiplier (TempBalance s1)
  lr_slope: float = 1.0                  # linear / rank maps: range width (TempBalance s2 - s1)
  sigmoid_min: float = 2.0               # sigmoid: s_min, used below the mean alpha
  sigmoid_max: float = 1.0               # sigmoid: s_max, used above the mean alpha
  exp_temp: float = 10.0                 # sigmoid: temperature T
  normalize: bool = False                # tb_lr_normalize: mean multiplier 1
  hyperparam: str = "lr"                 # lr | wd | hybrid: which layerwise states a refresh writes
  esd: diagnostics.EsdConfig = dataclasses.field(default_factory=lambda: diagnostics.EsdConfig.tempbalance())

  def __post_init__(self):
    for name, value, valid in (("assign", self.assign, ASSIGN_FUNCS),
                               ("granularity", self.granularity, ("layer", "block")),
                               ("block_unit", self.block_unit, ("block", "layer")),
                               ("hyperparam", self.hyperparam, ("lr", "wd", "hybrid"))):
      if value not in valid:
        raise ValueError(f"TempBalanceConfig.{name}={value!r}; valid: {valid}")

  def replace(self, **kw) -> "TempBalanceConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def tempbalance(cls, **kw):
    """TempBalance (NeurIPS 2023) defaults: per-layer linear map to [0.5, 1.5], median alpha."""
    return cls(**{**dict(assign="tb_linear_map", granularity="layer", esd=diagnostics.EsdConfig.tempbalance()),
                  **kw})

  @classmethod
  def model_balancing(cls, **kw):
    """Model Balancing's GLUE recipe: block-level sigmoid (s_min=2, s_max=1, T=10), last layer removed."""
    return cls(**{**dict(assign="sigmoid", granularity="block", block_unit="block",
                         esd=diagnostics.EsdConfig.model_balancing()), **kw})


class Schedule(NamedTuple):
  """The outcome of one ESD refresh, for logging and for writing the multipliers."""
  records: list                 # [diagnostics.EsdRecord]
  per_record: dict              # (path, layer) -> multiplier of the scheduled matrices
  per_block: dict               # block -> multiplier (block granularity: every leaf of the block)


def schedule(params: Params, config: TempBalanceConfig, *, init_params=None, records=None) -> Schedule:
  """Fits alpha (unless `records` are given) and maps it to multipliers."""
  if records is None:
    records = diagnostics.analyze(params, config.esd, init_params=init_params)
  used = [r for r in records if r.skipped is None]
  if not used:
    return Schedule(records, {}, {})
  fmap = _mapping(config)
  if config.granularity == "layer":
    f = np.asarray(fmap(np.asarray([r.alpha for r in used])), np.float64)
    if config.normalize:
      f = normalize_mean(f)
    return Schedule(records, {(r.path, r.layer): float(v) for r, v in zip(used, f)}, {})

  blocked = [r for r in used if r.layer is not None]
  blocks = sorted({r.layer for r in blocked})
  mean_alpha = np.asarray([np.mean([r.alpha for r in blocked if r.layer == b]) for b in blocks])
  f_block = dict(zip(blocks, np.asarray(fmap(mean_alpha), np.float64))) if blocks else {}
  per_record = {}
  for b in blocks:
    members = [r for r in blocked if r.layer == b]
    if config.block_unit == "layer":
      spread = linear_map(np.asarray([r.alpha for r in members]), config.lr_min_ratio, config.lr_slope)
    else:
      spread = np.ones(len(members))
    per_record.update({(r.path, r.layer): float(f_block[b] * s) for r, s in zip(members, spread)})
  if config.normalize and per_record:
    # Model Balancing normalises over every analysed matrix: those outside any block (a head) enter at 1
    # and leave rescaled like the rest.
    outside = [(r.path, r.layer) for r in used if r.layer is None]
    values = list(per_record.values()) + [1.0] * len(outside)
    scale = 1.0 / float(np.mean(values))
    per_record = {k: v * scale for k, v in per_record.items()}
    per_record.update({k: scale for k in outside})
    f_block = {b: v * scale for b, v in f_block.items()}
  return Schedule(records, per_record, {int(b): float(v) for b, v in f_block.items()})


# ---------------------------------------------------------------------------------------------------
# Optax transforms
# ---------------------------------------------------------------------------------------------------
class ScaleByLayerwiseLrState(NamedTuple):
  multipliers: optax.Params   # per leaf: () float32, or [L] float32 for a leaf stacked on the layer axis


class AddLayerwiseDecayState(NamedTuple):
  multipliers: optax.Params   # per leaf, as above: the factor on the weight decay


def _stacked(path: str, stacked_prefix: str) -> bool:
  return bool(stacked_prefix) and (path == stacked_prefix or path.startswith(stacked_prefix + "/"))


def init_multipliers(params: Params, stacked_prefix: str = "layers") -> Params:
  """Ones: () per leaf, [L] for leaves under `stacked_prefix` (their first axis is the layer)."""
  def one(p, x):
    if _stacked(path_str(p), stacked_prefix) and jnp.ndim(x) >= 1:
      return jnp.ones((jnp.shape(x)[0],), jnp.float32)
    return jnp.ones((), jnp.float32)
  return jax.tree_util.tree_map_with_path(one, params)


def _broadcast(f, x):
  return f.reshape(f.shape + (1,) * (x.ndim - f.ndim))


def scale_by_layerwise_lr(stacked_prefix: str = "layers") -> optax.GradientTransformation:
  """u <- u * f with a per-leaf multiplier tree f held in the state (1 until `refresh_multipliers`).

  Put it last, after `scale_by_learning_rate`, so f multiplies the whole step including the decoupled
  decay, as a PyTorch per-parameter-group learning rate does.
  """
  def init_fn(params):
    return ScaleByLayerwiseLrState(init_multipliers(params, stacked_prefix))

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, f: (u * _broadcast(f, u)).astype(u.dtype), updates, state.multipliers)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def add_layerwise_decayed_weights(weight_decay: float = 0.0, mask=None,
                                  stacked_prefix: str = "layers") -> optax.GradientTransformation:
  """u <- u + weight_decay * f * p, f a per-leaf multiplier tree in the state (`hyperparam='wd'`)."""
  def init_fn(params):
    return AddLayerwiseDecayState(init_multipliers(params, stacked_prefix))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    updates = jax.tree.map(lambda u, p, f: (u + weight_decay * _broadcast(f, p) * p).astype(u.dtype),
                           updates, params, state.multipliers)
    return updates, state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return optax.masked(tx, mask) if mask is not None else tx


def tempbalance(base_tx: optax.GradientTransformation, stacked_prefix: str = "layers"
                ) -> optax.GradientTransformation:
  """`base_tx` (a complete optimizer, learning rate included) followed by the layerwise LR multipliers."""
  return optax.chain(base_tx, scale_by_layerwise_lr(stacked_prefix))


def adamw_layerwise_wd(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       weight_decay: float = 1e-4, mask=None, stacked_prefix: str = "layers"
                       ) -> optax.GradientTransformation:
  """AdamW whose decoupled decay is scaled per layer (`hyperparam='wd'`; the learning rate stays global)."""
  return optax.chain(optax.scale_by_adam(b1, b2, eps),
                     add_layerwise_decayed_weights(weight_decay, mask, stacked_prefix),
                     optax.scale_by_learning_rate(learning_rate))


# ---------------------------------------------------------------------------------------------------
# Refresh (host side)
# ---------------------------------------------------------------------------------------------------
def _lookup(sched: Schedule, config: TempBalanceConfig):
  """f(leaf path, layer or None) for one leaf or one slice of a stacked leaf."""
  by_path = {}
  by_module = {}
  for (path, layer), f in sched.per_record.items():
    by_path[(path, layer)] = f
    by_module.setdefault((path.rsplit("/", 1)[0], layer), f)
  block_level = config.granularity == "block"

  def f(path: str, layer: Optional[int]) -> float:
    parts = path.split("/")
    for k in range(len(parts), 0, -1):           # the kernel itself, or an adapter child of it
      prefix = "/".join(parts[:k])
      if (prefix, layer) in by_path:
        return by_path[(prefix, layer)]
    for k in range(len(parts) - 1, 0, -1):       # another leaf of a scheduled module (its bias)
      prefix = "/".join(parts[:k])
      if (prefix, layer) in by_module:
        return by_module[(prefix, layer)]
    if block_level:
      block = layer if layer is not None else diagnostics.block_of(path)
      if block is not None and block in sched.per_block:
        return sched.per_block[block]
    return 1.0

  return f


def multiplier_tree(template: Params, sched: Schedule, config: TempBalanceConfig) -> Params:
  """A multiplier tree shaped like `template` (an existing one) filled from a schedule."""
  f = _lookup(sched, config)
  prefix = config.esd.stacked_prefix

  def fill(p, old):
    path = path_str(p)
    if old.ndim == 1:                    # init_multipliers gives [L] only to stacked leaves
      values = np.asarray([f(path, l) for l in range(old.shape[0])])
    else:                                # records of unstacked matrices carry the block parsed from the path
      values = np.asarray(f(path, None if _stacked(path, prefix) else diagnostics.block_of(path)))
    return jnp.asarray(values.astype(old.dtype).reshape(old.shape))

  return jax.tree_util.tree_map_with_path(fill, template)


def refresh_multipliers(opt_state, params: Params, config: TempBalanceConfig, *, init_params=None,
                        sched: Optional[Schedule] = None):
  """Recomputes alpha from `params` and writes the new multipliers into every layerwise state.

  Host-side; the returned state has the structure, shapes and dtypes of the old one, so the jitted step
  that consumes it is not retraced. `hyperparam` picks the states: lr (ScaleByLayerwiseLrState), wd
  (AddLayerwiseDecayState) or hybrid (both).
  """
  if sched is None:
    sched = schedule(params, config, init_params=init_params)
  kinds = {"lr": (ScaleByLayerwiseLrState,), "wd": (AddLayerwiseDecayState,),
           "hybrid": (ScaleByLayerwiseLrState, AddLayerwiseDecayState)}[config.hyperparam]
  is_state = lambda x: isinstance(x, (ScaleByLayerwiseLrState, AddLayerwiseDecayState))

  def rewrite(x):
    if isinstance(x, kinds):
      return type(x)(multiplier_tree(x.multipliers, sched, config))
    return x

  return jax.tree.map(rewrite, opt_state, is_leaf=is_state)


# ---------------------------------------------------------------------------------------------------
# In a training run: `config.tempbalance` and the host hook that refreshes the multipliers
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """`config.tempbalance` of a training run: when the ESD is fitted, with which estimator, and whether the
  multipliers are written (else the per-block alphas are only logged). The mapping's own options are the
  fields of `TempBalanceConfig`, which sit beside these in the same config section."""
  enabled: bool = False              # write layerwise multipliers (TempBalance / Model Balancing)
  esd_interval: int = 0              # steps between ESD fits (TensorBoard `alpha/block_<l>`); 0 = never
  esd_preset: str = "tempbalance"    # tempbalance | model_balancing | weightwatcher (xmin rule etc.)
  eigs_thresh: int = 50              # matrices with fewer eigenvalues keep the base rate
  mapping: TempBalanceConfig = dataclasses.field(default_factory=TempBalanceConfig)

  @classmethod
  def from_config(cls, section) -> "RunConfig":
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    own = {f.name for f in dataclasses.fields(cls)} - {"mapping"}
    mapping = {f.name for f in dataclasses.fields(TempBalanceConfig)} - {"esd"}
    unknown = sorted(set(given) - own - mapping)
    if unknown:
      raise ValueError(f"config.tempbalance: unknown key(s) {unknown}; valid: {', '.join(sorted(own | mapping))}")
    if given.get("esd_preset", cls.esd_preset) not in diagnostics.ESD_PRESETS:
      raise ValueError(f"config.tempbalance.esd_preset={given['esd_preset']!r}; valid: {diagnostics.ESD_PRESETS}")
    run = cls(**{k: v for k, v in given.items() if k in own})
    if int(run.esd_interval) < 0:
      raise ValueError(f"config.tempbalance.esd_interval must be >= 0 (0 = never), got {run.esd_interval}")
    if run.enabled and int(run.esd_interval) <= 0:
      raise ValueError("config.tempbalance.enabled=True needs config.tempbalance.esd_interval > 0 (the steps "
                       "between ESD fits); with esd_interval=0 the multipliers would never be computed")
    if int(run.eigs_thresh) < 0:
      raise ValueError(f"config.tempbalance.eigs_thresh must be >= 0, got {run.eigs_thresh}")
    esd = getattr(diagnostics.EsdConfig, run.esd_preset)(eigs_thresh=run.eigs_thresh)
    return dataclasses.replace(run, mapping=TempBalanceConfig(
        esd=esd, **{k: v for k, v in given.items() if k in mapping}))


def default_config():
  """`config.tempbalance`: every field of `RunConfig` and `TempBalanceConfig` with its default."""
  import ml_collections   # pylint: disable=g-import-not-at-top
  run, mapping = RunConfig(), TempBalanceConfig()
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(RunConfig):
    if f.name != "mapping":
      c[f.name] = getattr(run, f.name)
  for f in dataclasses.fields(TempBalanceConfig):
    if f.name != "esd":
      c[f.name] = getattr(mapping, f.name)
  return c


def tempbalance_config(section) -> TempBalanceConfig:
  """The `TempBalanceConfig` (mapping and estimator) of a `config.tempbalance` section."""
  return RunConfig.from_config(section).mapping


def _esd_enabled(config) -> bool:
  return config.get("tempbalance") is not None and RunConfig.from_config(config.tempbalance).esd_interval > 0


@hooks.register_hook("tempbalance", enabled=_esd_enabled, order=-1)
def _esd_refresh_hook(config, model) -> hooks.HostHook:
  """Every `esd_interval` steps: HT-SR alphas of the current weights -> `alpha/block_<l>`, and (enabled)
  new layerwise multipliers written into the optimizer state, same shapes and shardings."""
  run = RunConfig.from_config(config.tempbalance)

  def refresh(step, state, frozen, tx):
    del step, tx
    params_now = jax.device_get(peft.combine(state.params, frozen))
    sched = schedule(params_now, run.mapping)
    alphas = diagnostics.block_alphas(sched.records, model.config.num_layers)
    metrics = {f"alpha/block_{l}": a for l, a in enumerate(alphas) if np.isfinite(a)}
    if run.enabled:
      opt_state = refresh_multipliers(state.opt_state, params_now, run.mapping, sched=sched)
      state = state._replace(opt_state=peft.place_like(opt_state, state.opt_state))
    return state, frozen, metrics

  return hooks.HostHook(every=run.esd_interval, refresh=refresh)
