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
maps each matrix (TempBalance) and the other leaves of its module (its bias) follow it; a block's norms keep
f = 1 (TempBalance's `layernorm=False`) or, `norm_rate='block_last'`, take the rate of the block's last
scheduled matrix (Model Balancing: a norm follows the parameter before it, down_proj in a Llama block).
Other leaves with no ESD keep f = 1. `normalize=True` (`tb_lr_normalize`) rescales f to mean 1. Model
Balancing's `tb_layer_groups` interpolates against a reversed range (higher alpha, lower rate); that mode is
deliberately not offered.

The multipliers are traced optimizer state of fixed shapes (per leaf: () or, for stacked `[L, ...]` leaves,
[L] broadcast over each slice), so `refresh_multipliers` never recompiles the jitted step:

    tx = optim.tempbalance(optax.adamw(schedule, weight_decay=0.1))
    opt_state = tx.init(params)
    ...
    if step % esd_interval == 0:
      opt_state = optim.refresh_multipliers(opt_state, params, optim.TempBalanceConfig.tempbalance())

With `hyperparam='wd'` the multipliers scale the weight decay instead (`layerwise_decay` after any optimizer
whose decay is -eta_t wd p, or `add_layerwise_decayed_weights` inside a hand-built chain), with the linear
and rank maps over [wd_min_ratio, wd_min_ratio + wd_slope]; `'hybrid'` writes both, each from its own range. With adapters, alpha is measured on W0 + s BA (`esd.esd_type='full'`) and f scales
the adapter leaves' updates (their paths extend the kernel's path). With GaLore the transform scales the
back-projected update, since it comes last in the chain.

References: Zhou, Pang, Liu, Martin, Mahoney, Yang, "Temperature Balancing, Layer-wise Weight Analysis, and
Neural Network Training", NeurIPS 2023; Liu, Hu, Pang, Zhou, Ren, Yang, "Model Balancing Helps Low-data
Training and Fine-tuning", EMNLP 2024.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import diagnostics
import hooks
import peft
from optim import _sampling
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


def _mapping(config: "TempBalanceConfig", hyperparam: str = "lr") -> Callable:
  """alpha -> multiplier for the learning rate, or (`hyperparam='wd'`) for the weight decay: the linear and
  rank maps then span [wd_min_ratio, wd_min_ratio + wd_slope] (Model Balancing's `wd_min_ratio`,
  `wd_slope`), the other maps are the same."""
  c = config
  lo, slope = (c.lr_min_ratio, c.lr_slope) if hyperparam == "lr" else (c.wd_min_ratio, c.wd_slope)
  return {
      "tb_linear_map": lambda a: linear_map(a, lo, slope),
      "linear_map": lambda a: linear_map(a, lo, slope),
      "tb_sqrt": tb_sqrt,
      "tb_log2": tb_log2,
      "tb_step": lambda a: rank_map(a, lo, slope),
      "rank": lambda a: rank_map(a, lo, slope),
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
  wd_min_ratio: float = 0.5              # hyperparam wd / hybrid: the same for the weight-decay multipliers
  wd_slope: float = 1.0
  sigmoid_min: float = 2.0               # sigmoid: s_min, used below the mean alpha
  sigmoid_max: float = 1.0               # sigmoid: s_max, used above the mean alpha
  exp_temp: float = 10.0                 # sigmoid: temperature T
  normalize: bool = False                # tb_lr_normalize: mean multiplier 1
  norm_rate: str = "base"                # per layer, a block's norms: base (TempBalance, f = 1) | block_last
                                         # (Model Balancing: the rate of the block's last matrix, down_proj)
  hyperparam: str = "lr"                 # lr | wd | hybrid: which layerwise states a refresh writes
  esd: diagnostics.EsdConfig = dataclasses.field(default_factory=lambda: diagnostics.EsdConfig.tempbalance())

  def __post_init__(self):
    for name, value, valid in (("assign", self.assign, ASSIGN_FUNCS),
                               ("granularity", self.granularity, ("layer", "block")),
                               ("block_unit", self.block_unit, ("block", "layer")),
                               ("hyperparam", self.hyperparam, ("lr", "wd", "hybrid")),
                               ("norm_rate", self.norm_rate, ("base", "block_last"))):
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
    return cls(**{**dict(assign="sigmoid", granularity="block", block_unit="block", norm_rate="block_last",
                         esd=diagnostics.EsdConfig.model_balancing()), **kw})


class Schedule(NamedTuple):
  """The outcome of one ESD refresh, for logging and for writing the multipliers."""
  records: list                 # [diagnostics.EsdRecord]
  per_record: dict              # (path, layer) -> multiplier of the scheduled matrices
  per_block: dict               # block -> multiplier (block granularity: every leaf of the block)


def schedule(params: Params, config: TempBalanceConfig, *, init_params=None, records=None,
             hyperparam: str = "lr") -> Schedule:
  """Fits alpha (unless `records` are given) and maps it to multipliers of the learning rate or (`'wd'`)
  of the weight decay."""
  if records is None:
    records = diagnostics.analyze(params, config.esd, init_params=init_params)
  used = [r for r in records if r.skipped is None]
  if not used:
    return Schedule(records, {}, {})
  fmap = _mapping(config, hyperparam)
  lo, slope = (config.lr_min_ratio, config.lr_slope) if hyperparam == "lr" else (config.wd_min_ratio,
                                                                                 config.wd_slope)
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
      spread = linear_map(np.asarray([r.alpha for r in members]), lo, slope)
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


class LayerwiseDecayState(NamedTuple):
  count: jax.Array            # (), int32: updates so far (the schedule's step)
  multipliers: optax.Params   # per leaf, as above: the factor f on the optimizer's own weight decay


def layerwise_decay(learning_rate: optax.ScalarOrSchedule, weight_decay: Params,
                    stacked_prefix: str = "layers") -> optax.GradientTransformation:
  """u <- u - eta_t * wd * (f - 1) * p: turns an optimizer's decoupled decay -eta_t wd p into
  -eta_t wd f p (`hyperparam='wd'`), whatever else that optimizer does.

  `weight_decay` is a tree of floats shaped like the parameters: each leaf's decay as its optimizer applies
  it (0 where the weight-decay mask or the optimizer has none). Valid for optimizers whose decay is
  -eta_t wd p with the schedule's eta_t (AdamW and the projected optimizers built on it); the factory
  refuses the others. Put it before `scale_by_layerwise_lr` so that 'hybrid' gives
  -eta_t f_lr (step + wd f_wd p), as a PyTorch parameter group with both lr and weight_decay set.
  """
  def init_fn(params):
    return LayerwiseDecayState(jnp.zeros((), jnp.int32), init_multipliers(params, stacked_prefix))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(
        lambda u, p, f, wd: u if not wd else (u - eta * wd * (_broadcast(f, p) - 1.0) * p).astype(u.dtype),
        updates, params, state.multipliers, weight_decay)
    return updates, LayerwiseDecayState(optax.safe_int32_increment(state.count), state.multipliers)

  return optax.GradientTransformation(init_fn, update_fn)


def tempbalance(base_tx: optax.GradientTransformation, stacked_prefix: str = "layers", *,
                hyperparam: str = "lr", learning_rate: Optional[optax.ScalarOrSchedule] = None,
                weight_decay: Optional[Params] = None) -> optax.GradientTransformation:
  """`base_tx` (a complete optimizer, learning rate included) followed by the layerwise multipliers: of the
  learning rate (`hyperparam='lr'`), of its weight decay (`'wd'`, needs `learning_rate` and the per-leaf
  `weight_decay` tree, see `layerwise_decay`), or both (`'hybrid'`)."""
  parts = [base_tx]
  if hyperparam in ("wd", "hybrid"):
    if learning_rate is None or weight_decay is None:
      raise ValueError(f"tempbalance(hyperparam={hyperparam!r}) needs learning_rate and weight_decay")
    parts.append(layerwise_decay(learning_rate, weight_decay, stacked_prefix))
  if hyperparam in ("lr", "hybrid"):
    parts.append(scale_by_layerwise_lr(stacked_prefix))
  return optax.chain(*parts)


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
  last_in_block = {}     # per_record is in network order: the block's last scheduled matrix (down_proj)
  for (path, layer), v in sched.per_record.items():
    if layer is not None:
      last_in_block[layer] = v

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
    if config.norm_rate == "block_last" and not set(parts) & set(config.esd.matrix_names):
      block = layer if layer is not None else diagnostics.block_of(path)
      if block in last_in_block:                 # a norm of the block (not a matrix left unscheduled)
        return last_in_block[block]
    return 1.0

  return f


def multiplier_tree(template: Params, sched: Schedule, config: TempBalanceConfig,
                    slot_blocks: Optional[np.ndarray] = None) -> Params:
  """A multiplier tree shaped like `template` (an existing one) filled from a schedule.

  Under layer sampling the stacked leaves are `slots [gamma, ...]` of the blocks `slot_blocks` (ascending,
  `peft.sampled_blocks`): slot k takes block slot_blocks[k]'s multiplier."""
  f = _lookup(sched, config)
  prefix = config.esd.stacked_prefix

  def fill(p, old):
    path = path_str(p)
    if old.ndim == 1:                    # init_multipliers gives [L] (or [gamma]) only to stacked leaves
      blocks = range(old.shape[0])
      if slot_blocks is not None and path.endswith("/slots"):
        blocks = [int(b) for b in slot_blocks]
      values = np.asarray([f(path, l) for l in blocks])
    else:                                # records of unstacked matrices carry the block parsed from the path
      values = np.asarray(f(path, None if _stacked(path, prefix) else diagnostics.block_of(path)))
    return jnp.asarray(values.astype(old.dtype).reshape(old.shape))

  return jax.tree_util.tree_map_with_path(fill, template)


def _ones_schedule(records=()) -> Schedule:
  return Schedule(list(records), {}, {})


def refresh_multipliers(opt_state, params: Params, config: TempBalanceConfig, *, init_params=None,
                        sched: Optional[Schedule] = None, wd_sched: Optional[Schedule] = None,
                        slot_blocks: Optional[np.ndarray] = None):
  """Recomputes alpha from `params` and writes the new multipliers into every layerwise state.

  Host-side; the returned state has the structure, shapes and dtypes of the old one, so the jitted step
  that consumes it is not retraced. `hyperparam` picks the states: lr (ScaleByLayerwiseLrState), wd
  (AddLayerwiseDecayState, LayerwiseDecayState) or hybrid (both). The learning-rate multipliers come from
  `sched`, the weight-decay ones from `wd_sched` (the same alphas through the wd ranges); either is
  computed when not given.
  """
  if sched is None:
    sched = schedule(params, config, init_params=init_params)
  if wd_sched is None and config.hyperparam != "lr":
    wd_sched = schedule(params, config, records=sched.records, hyperparam="wd")
  lr_kinds = (ScaleByLayerwiseLrState,) if config.hyperparam in ("lr", "hybrid") else ()
  wd_kinds = (AddLayerwiseDecayState, LayerwiseDecayState) if config.hyperparam in ("wd", "hybrid") else ()
  is_state = lambda x: isinstance(x, (ScaleByLayerwiseLrState, AddLayerwiseDecayState, LayerwiseDecayState))

  def rewrite(x):
    if isinstance(x, lr_kinds) or isinstance(x, wd_kinds):
      tree = multiplier_tree(x.multipliers, sched if isinstance(x, lr_kinds) else wd_sched, config, slot_blocks)
      return x._replace(multipliers=tree)
    return x

  return jax.tree.map(rewrite, opt_state, is_leaf=is_state)


# ---------------------------------------------------------------------------------------------------
# In a training run: `config.tempbalance` and the host hook that refreshes the multipliers
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """`config.tempbalance` of a training run: when the ESD is fitted, with which estimator, and whether the
  multipliers are written (else the per-block alphas are only logged). The mapping's own options are the
  fields of `TempBalanceConfig`, which sit beside these in the same config section. A `None` estimator
  field takes the value of `esd_preset` (`diagnostics.EsdConfig.<preset>`, the reference's default)."""
  enabled: bool = False              # write layerwise multipliers (TempBalance / Model Balancing)
  esd_interval: int = 0              # steps between ESD fits (TensorBoard `alpha/block_<l>`); 0 = never
  esd_preset: str = "tempbalance"    # tempbalance | model_balancing | weightwatcher (xmin rule etc.)
  eigs_thresh: int = 50              # matrices with fewer eigenvalues keep the base rate
  xmin_pos: Optional[float] = None   # median xmin at 1/xmin_pos of the spectrum (presets: 2; MB's GLUE: 1.5)
  remove_first: Optional[bool] = None      # drop the first analysed matrix, block 0's q_proj (TB: yes, MB: no)
  remove_last: Optional[bool] = None       # drop the last analysed matrix, lm_head (TB and MB: yes)
  include_lm_head: Optional[bool] = None   # analyse lm_head, the references' last nn.Linear (TB, MB: yes)
  esd_type: str = "full"             # full: ESD of W_t | cul: of W_t - W_0 (step 0 uses W_0, as MB) | delta
  after_warm: bool = False           # multipliers 1 through config.optim.warmup_steps, mapped after (MB)
  fix_tb_metric: bool = False        # map the alphas of W_0 at every refresh (MB); the current ones are logged
  mapping: TempBalanceConfig = dataclasses.field(default_factory=TempBalanceConfig)

  @classmethod
  def from_config(cls, section) -> "RunConfig":
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    own = {f.name for f in dataclasses.fields(cls)} - {"mapping"}
    mapping = {f.name for f in dataclasses.fields(TempBalanceConfig)} - {"esd"}
    unknown = sorted(set(given) - own - mapping)
    if unknown:
      raise ValueError(f"config.tempbalance: unknown key(s) {unknown}; valid: {', '.join(sorted(own | mapping))}")
    given = {k: v for k, v in given.items() if v is not None}     # None: the default (or the preset's)
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
    overrides = {k: getattr(run, k) for k in ("xmin_pos", "remove_first", "remove_last", "include_lm_head")
                 if getattr(run, k) is not None}
    try:
      esd = getattr(diagnostics.EsdConfig, run.esd_preset)(eigs_thresh=run.eigs_thresh, esd_type=run.esd_type,
                                                           **overrides)
      mapping_cfg = TempBalanceConfig(esd=esd, **{k: v for k, v in given.items() if k in mapping})
    except ValueError as e:
      raise ValueError(f"config.tempbalance: {e}") from None
    return dataclasses.replace(run, mapping=mapping_cfg)


def default_config():
  """`config.tempbalance`: every field of `RunConfig` and `TempBalanceConfig` with its default (a `None`
  default, "the preset's", is a typed placeholder so that the command line can set it)."""
  import typing   # pylint: disable=g-import-not-at-top
  import ml_collections   # pylint: disable=g-import-not-at-top
  run, mapping = RunConfig(), TempBalanceConfig()
  hints = typing.get_type_hints(RunConfig)
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(RunConfig):
    if f.name == "mapping":
      continue
    value = getattr(run, f.name)
    if value is None:
      tp = [a for a in typing.get_args(hints[f.name]) if a is not type(None)][0]
      value = ml_collections.config_dict.placeholder(tp)
    c[f.name] = value
  for f in dataclasses.fields(TempBalanceConfig):
    if f.name != "esd":
      c[f.name] = getattr(mapping, f.name)
  return c


def tempbalance_config(section) -> TempBalanceConfig:
  """The `TempBalanceConfig` (mapping and estimator) of a `config.tempbalance` section."""
  return RunConfig.from_config(section).mapping


def _esd_enabled(config) -> bool:
  return config.get("tempbalance") is not None and RunConfig.from_config(config.tempbalance).esd_interval > 0


def _slot_blocks(frozen) -> Optional[np.ndarray]:
  """The sampled blocks when layer sampling holds the stacked layers in slots, else None."""
  if not any(peft.is_sampled(x) for x in jax.tree.leaves(frozen, is_leaf=peft.is_sampled)):
    return None
  return peft.sampled_blocks(frozen)


# Runs after the layer-sampling hooks (order 0), so a step that redraws the blocks gives the new slots their
# blocks' multipliers.
@hooks.register_hook("tempbalance", enabled=_esd_enabled, order=1)
def _esd_refresh_hook(config, model) -> hooks.HostHook:
  """Every `esd_interval` steps: HT-SR alphas of the current weights -> `alpha/block_<l>`, and (enabled)
  new layerwise multipliers written into the optimizer state, same shapes and shardings.

  The multipliers follow Model Balancing's trainer: from the latest fit (or, `fix_tb_metric`, the fit of
  W_0), 1 until the step after `config.optim.warmup_steps` (`after_warm`), and under layer sampling the
  slots take their current blocks' multipliers after every redraw (alphas are fitted on all blocks). The
  latest fit is saved with each checkpoint (`state` / `load_state`), so a resumed run maps the same fit at
  a redraw or at the end of warm-up as the uninterrupted run, and fits again at the same steps.
  """
  run = RunConfig.from_config(config.tempbalance)
  mapping = run.mapping
  warmup = int(config.optim.warmup_steps) if run.after_warm else -1
  # Under layer sampling the sampler re-initialises the slots' state (multipliers included) at each draw,
  # every K steps: the slots' multipliers are rewritten at those steps.
  redraw_every = None
  if run.enabled and (config.get("sampling") or {}).get("method"):
    redraw_every = _sampling.SamplingConfig.from_config(config, model.config.num_layers).interval_steps
  every = run.esd_interval if redraw_every is None else math.gcd(run.esd_interval, redraw_every)
  if run.enabled and run.after_warm:
    every = 1          # the step after warm-up is rarely a multiple of esd_interval
  needs_w0 = mapping.esd.esd_type == "cul" or run.fix_tb_metric
  cache = {"w0": None, "records": None, "fixed": None, "version": 0, "written": None}

  def init_params(params, rng):
    del rng
    if needs_w0:    # the weights training starts from (also on resume: these are the loaded weights)
      cache["w0"] = jax.device_get(peft.merge(params))
    return params

  def refresh(step, state, frozen, tx):
    del tx
    metrics = {}
    if step % run.esd_interval == 0 or (run.enabled and cache["records"] is None):
      # Layer-sampling slots are folded into their stacks on the device (every block's weight, fitted on the
      # host); adapter nodes stay nodes (esd_type='delta' needs their parts).
      params_now = jax.device_get(jax.tree.map(lambda x: x.materialize() if peft.is_sampled(x) else x,
                                               peft.combine(state.params, frozen), is_leaf=peft.is_sampled))
      esd = mapping.esd
      if esd.esd_type == "cul" and step == 0:     # W_0 - W_0 = 0: Model Balancing maps the full ESD at step 0
        esd = esd.replace(esd_type="full")
      cache["records"] = diagnostics.analyze(params_now, esd, init_params=cache["w0"])
      cache["version"] += 1
      alphas = diagnostics.block_alphas(cache["records"], model.config.num_layers)
      metrics = {f"alpha/block_{l}": a for l, a in enumerate(alphas) if np.isfinite(a)}
    if not run.enabled:
      return state, frozen, metrics
    records = cache["records"]
    if run.fix_tb_metric:
      if cache["fixed"] is None:
        cache["fixed"] = diagnostics.analyze(cache["w0"], mapping.esd.replace(esd_type="full"))
      records = cache["fixed"]
    active = step > warmup
    blocks = _slot_blocks(frozen)
    key = (cache["version"], active, None if blocks is None else tuple(int(b) for b in blocks))
    redrawn = redraw_every is not None and step % redraw_every == 0
    if key != cache["written"] or redrawn:
      if active:
        sched = schedule(None, mapping, records=records)
        wd_sched = schedule(None, mapping, records=records, hyperparam="wd") if mapping.hyperparam != "lr" else None
      else:
        sched = wd_sched = _ones_schedule(records)
      opt_state = refresh_multipliers(state.opt_state, None, mapping, sched=sched, wd_sched=wd_sched,
                                      slot_blocks=blocks)
      state = state._replace(opt_state=peft.place_like(opt_state, state.opt_state))
      cache["written"] = key
    return state, frozen, metrics

  def state():
    records = cache["records"]
    plain = lambda x: x.item() if isinstance(x, (np.generic, np.ndarray)) and np.ndim(x) == 0 else x
    dicts = None if records is None else [
        {k: (plain(v) if k != "config" else v) for k, v in r.to_dict().items()} for r in records]
    return {"records": dicts, "version": cache["version"]}

  def load_state(saved):
    if saved.get("records") is not None:
      cache["records"] = [diagnostics.EsdRecord.from_dict(r) for r in saved["records"]]
      cache["version"] = int(saved.get("version", 0))

  return hooks.HostHook(every=every, init_params=init_params, refresh=refresh, state=state,
                        load_state=load_state)
