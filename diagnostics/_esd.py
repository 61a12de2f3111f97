r"""Empirical spectral densities (ESDs) of the weight matrices of a parameter tree, and their HT-SR fits.

For a kernel W (m x n) the ESD is lambda_i = sigma_i(W)^2, the N = min(m, n) eigenvalues of the smaller Gram
matrix, with no 1/N normalisation (alpha and D depend only on ratios of eigenvalues; the norm metrics do
not). Spectra are orientation-free, so Flax `[in, out]` kernels need no transpose. Stacked decoder layers
`[L, in, out]` (paths under `stacked_prefix`) are fitted slice by slice. See `_powerlaw` for the fit.

    records = diagnostics.analyze(params, diagnostics.EsdConfig.weightwatcher())
    per_block = diagnostics.block_alphas(records)          # [L] mean alpha of each decoder block

Two precisions:
  float32  eigvalsh of the Gram matrix in float32 on the device, fit under jit (cheap; eigenvalues below
           about 1e-7 lambda_max are noise, harmless for the median fit). For in-training refreshes. The
           fix_finger histogram spans log10 of the smallest eigenvalues, so its peak can move with that
           noise (seen on a 4096 x 4096 Student-t kernel on a GPU; median and goodness_of_fit agreed).
  float64  singular values in float64 on the host (numpy). For reports, fix_finger and reference parity.

Adapters (`peft.Adapter` nodes): `esd_type='full'` analyses W0 + dW (the materialised node), `'delta'`
analyses dW = materialize() - base alone (Model Balancing's `lora_esd_estimator(add_W=False)`), and
`'cul'` analyses W_t - W_0 against `init_params` (Model Balancing's `net_cul_esd_estimator`).

References: Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 2021
(WeightWatcher); Zhou et al., "Temperature Balancing, Layer-wise Weight Analysis, and Neural Network
Training", NeurIPS 2023; Liu et al., "Model Balancing Helps Low-data Training and Fine-tuning", EMNLP 2024.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import peft
from diagnostics._powerlaw import MODES, fit_powerlaw, spectral_metrics

Params = Any
PRECISIONS = ("float32", "float64")
ESD_TYPES = ("full", "delta", "cul")
METRICS = ("alpha_weighted", "log_alpha_norm", "spectral_norm", "norm", "stable_rank", "norm_stable_rank",
           "eig_ratio")


ESD_PRESETS = ("tempbalance", "model_balancing", "weightwatcher")   # the EsdConfig classmethods


@dataclasses.dataclass(frozen=True)
class EsdConfig:
  """How spectra are fitted and which matrices are analysed. Saved with every record."""
  mode: str = "median"                  # median | goodness_of_fit | fix_finger (see _powerlaw)
  xmin_pos: float = 2.0                 # median: xmin at 1/xmin_pos of the kept spectrum; must be > 1
  bins: int = 100                       # fix_finger: histogram bins of log10 lambda
  compat_fix_finger_bug: bool = False   # fix_finger: the references' log10 lower bound (parity runs only)
  clip_xmax: bool = False               # WeightWatcher's fix_fingers='clip_xmax' (off, as there; _powerlaw)
  max_fingers: int = 10                 # clip_xmax: clip up to max_fingers - 1 top eigenvalues
  finger_thresh: float = 1.0            # clip_xmax: alpha must drop by more than this
  filter_zeros: bool = False            # keep only lambda > zero_thresh (WeightWatcher always does)
  zero_thresh: float = 1e-5             # absolute, like every reference
  eigs_thresh: int = 50                 # matrices with fewer eigenvalues (min side) are skipped
  remove_first: bool = False            # exclude the first analysed matrix in network order
  remove_last: bool = False             # exclude the last analysed matrix in network order
  exclude_before_thresh: bool = False   # first/last among all analysed matrices, before the eigs_thresh skip
                                        # (TempBalance); False: among the fitted ones (Model Balancing)
  include_lm_head: bool = False         # analyse paths matching head_pattern (the torch references' last layer)
  include_embed: bool = False           # analyse embedding tables (the torch references never do)
  precision: str = "float32"            # float32 (device, jit) | float64 (host numpy)
  esd_type: str = "full"                # full (W, adapters merged) | delta (adapter dW only) | cul (W - W_0)
  stacked_prefix: str = "layers"        # subtree whose leaves carry the scanned layer axis first
  matrix_names: tuple = ("kernel",)     # last path component of an analysed matrix
  embed_names: tuple = ("embedding",)
  head_pattern: str = r"(^|.*/)lm_head/.*"
  # Network order inside a block (HF Llama's `named_modules`): q, k, v, o, gate, up, down; a module named
  # in none of these sorts after them, by path.
  module_order: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  chunk: int = 256                      # rows per chunk of the O(N^2) KS scan

  def __post_init__(self):
    for name, value, valid in (("mode", self.mode, MODES), ("precision", self.precision, PRECISIONS),
                               ("esd_type", self.esd_type, ESD_TYPES)):
      if value not in valid:
        raise ValueError(f"EsdConfig.{name}={value!r}; valid: {valid}")
    if not self.xmin_pos > 1:
      raise ValueError(f"EsdConfig.xmin_pos={self.xmin_pos} must be > 1 (xmin_pos=1 puts xmin past the top)")
    if self.bins < 1 or self.chunk < 1 or self.eigs_thresh < 0:
      raise ValueError("EsdConfig: bins and chunk must be >= 1 and eigs_thresh >= 0")

  @classmethod
  def make(cls, config=None, **overrides) -> "EsdConfig":
    """From None, an EsdConfig, or a mapping / ConfigDict of field values (unknown keys raise)."""
    if config is None:
      config = cls()
    elif not isinstance(config, EsdConfig):
      items = dict(config.items() if hasattr(config, "items") else config)
      unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"unknown EsdConfig fields {sorted(unknown)}; valid: "
                         f"{[f.name for f in dataclasses.fields(cls)]}")
      if "matrix_names" in items:
        items["matrix_names"] = tuple(items["matrix_names"])
      for key in ("embed_names", "module_order"):
        if key in items:
          items[key] = tuple(items[key])
      config = cls(**items)
    return dataclasses.replace(config, **overrides) if overrides else config

  def replace(self, **kw) -> "EsdConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  # ---- presets: the defaults of each reference -------------------------------------------------------
  @classmethod
  def tempbalance(cls, **kw):
    """TempBalance `Tempbalance(...)`: median xmin, no zero filter, first and last layer removed.

    Its `net_esd_estimator` walks `named_modules()` over every nn.Linear / nn.Conv2d, so on a causal LM the
    first analysed matrix is block 0's q_proj (the embedding is an nn.Embedding) and the last is lm_head;
    the first/last rows are dropped before the eigenvalue-count filter."""
    return cls(**{**dict(mode="median", xmin_pos=2.0, eigs_thresh=50, remove_first=True, remove_last=True,
                         include_lm_head=True, exclude_before_thresh=True), **kw})

  @classmethod
  def model_balancing(cls, **kw):
    """Model Balancing `net_esd_estimator(fix_fingers='xmin_mid')`; its GLUE script uses xmin_pos=1.5.
    Every nn.Linear with at least `eigs_num_thresh` eigenvalues, in `named_modules()` order (lm_head
    last), then `remove_last_layer` drops the last of them: lm_head on a causal LM."""
    return cls(**{**dict(mode="median", xmin_pos=2.0, eigs_thresh=50, remove_last=True, include_lm_head=True),
                  **kw})

  @classmethod
  def weightwatcher(cls, **kw):
    """WeightWatcher `analyze()` defaults: goodness-of-fit scan, zeros filtered, min_evals=8, float64."""
    return cls(**{**dict(mode="goodness_of_fit", filter_zeros=True, eigs_thresh=8, precision="float64"),
                  **kw})


@dataclasses.dataclass(frozen=True)
class EsdRecord:
  """The fit of one matrix (or one slice of a stacked kernel)."""
  path: str                     # '/'-joined path of the kernel (the adapter node's path for adapters)
  layer: Optional[int]          # slice of a stacked kernel, or the block number parsed from the path
  shape: tuple                  # (in, out) of the matrix
  n_evals: int                  # N = min(in, out)
  n_valid: int                  # eigenvalues kept by the zero filter
  alpha: float                  # NaN when skipped before fitting
  D: float
  xmin: float
  sigma: float
  n_tail: int
  metrics: Mapping[str, float]
  skipped: Optional[str]        # None, or why the record is left out of any schedule
  config: EsdConfig

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("metrics", "config")}
    return {**d, **self.metrics, "config": self.config.to_dict()}

  @classmethod
  def from_dict(cls, d: Mapping) -> "EsdRecord":
    """The record `to_dict` wrote (also after a JSON round trip: lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"metrics", "config"}
    fields = {k: d[k] for k in names}
    fields["shape"] = tuple(fields["shape"])
    metrics = {k: v for k, v in d.items() if k not in names and k != "config"}
    return cls(**fields, metrics=metrics, config=EsdConfig.make(d["config"]))


# ---------------------------------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------------------------------
def esd(w, precision: str = "float32"):
  """Ascending eigenvalues [..., N] of the smaller Gram matrix of w [..., m, n]."""
  if precision == "float64":
    w = np.asarray(w, np.float64)
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2, axis=-1)
  w = jnp.asarray(w, jnp.float32)
  wt = jnp.swapaxes(w, -1, -2)
  hi = jax.lax.Precision.HIGHEST        # no bf16 passes on TPU: the small eigenvalues are the tail's base
  gram = jnp.matmul(w, wt, precision=hi) if w.shape[-2] <= w.shape[-1] else jnp.matmul(wt, w, precision=hi)
  return jnp.maximum(jnp.linalg.eigvalsh(gram), 0.0)


def _num_valid(lam, config: EsdConfig):
  xp = np if isinstance(lam, np.ndarray) else jnp
  N = lam.shape[-1]
  if not config.filter_zeros:
    return N
  m = xp.sum(lam > config.zero_thresh)
  return xp.where(m == 0, N, m)         # like the references: nothing above the threshold keeps all


def fit_spectrum(lam, config: EsdConfig) -> dict:
  """Fit and metrics of one ascending spectrum [N]; numpy on the host or jax under jit."""
  m = _num_valid(lam, config)
  fit = fit_powerlaw(lam, mode=config.mode, xmin_pos=config.xmin_pos, num_valid=m, bins=config.bins,
                     compat_fix_finger_bug=config.compat_fix_finger_bug, chunk=config.chunk,
                     clip_xmax=config.clip_xmax, max_fingers=config.max_fingers,
                     finger_thresh=config.finger_thresh)
  return dict(fit._asdict(), n_valid=m, **spectral_metrics(lam, fit.alpha, m))


@functools.partial(jax.jit, static_argnums=1)
def _fit_device(w, config: EsdConfig):
  lam = esd(w, "float32")
  fn = lambda l: fit_spectrum(l, config)
  for _ in range(lam.ndim - 1):
    fn = jax.vmap(fn)
  return fn(lam)


def fit_matrices(w, config: EsdConfig) -> dict:
  """{field: np.ndarray[...]} of the fits of every matrix in w [..., m, n]."""
  if config.precision == "float32":
    return jax.tree.map(np.asarray, jax.device_get(_fit_device(jnp.asarray(w), config)))
  lam = esd(w, "float64")
  flat = lam.reshape(-1, lam.shape[-1])
  rows = [fit_spectrum(l, config) for l in flat]
  return {k: np.asarray([r[k] for r in rows]).reshape(lam.shape[:-1]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"(?:^|/)(\d+)(?:/|$)")


def block_of(path: str) -> Optional[int]:
  """The first all-digit path component (`layers/3/...`), Model Balancing's `(.*?)\\.(\\d+)\\.(.*)`."""
  match = _BLOCK.search(path)
  return int(match.group(1)) if match else None


def network_order_key(path: str, layer: Optional[int], config: EsdConfig) -> tuple:
  """Sort key of a matrix (or stacked slice) in network order: the embedding, then block by block its
  modules in `config.module_order`, then other matrices outside the blocks, then the head."""
  name = path.rsplit("/", 1)[-1]
  if re.fullmatch(config.head_pattern, path):
    segment = 3
  elif name in config.embed_names:
    segment = 0
  elif layer is None:
    segment = 2
  else:
    segment = 1
  parts = path.split("/")
  rank = next((i for i, m in enumerate(config.module_order) if m in parts), len(config.module_order))
  return (segment, -1 if layer is None else layer, rank, path)


def is_stacked(path: str, config: EsdConfig) -> bool:
  p = config.stacked_prefix
  return bool(p) and (path == p or path.startswith(p + "/"))


def _leaves(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=peft.is_adapter)
  return [(peft.path_str(p), x) for p, x in flat if x is not None]


def _selected(path: str, leaf, config: EsdConfig) -> bool:
  name = path.rsplit("/", 1)[-1]
  if re.fullmatch(config.head_pattern, path):
    if not config.include_lm_head:
      return False
  elif name in config.embed_names:
    if not config.include_embed:
      return False
  elif name not in config.matrix_names:
    return False
  shape = (leaf.frozen_base() if peft.is_adapter(leaf) else leaf).shape
  return len(shape) == (3 if is_stacked(path, config) else 2)


def _merged(leaf):
  return leaf.materialize() if peft.is_adapter(leaf) else leaf


def _matrix(path: str, leaf, config: EsdConfig, init: Optional[dict]):
  """(the matrix to analyse, or None, and why not). Differences are taken in the fit's precision."""
  cast = ((lambda x: np.asarray(x, np.float64)) if config.precision == "float64"
          else (lambda x: jnp.asarray(x, jnp.float32)))
  if config.esd_type == "full":
    return _merged(leaf), None
  if config.esd_type == "delta":
    if not peft.is_adapter(leaf):
      return None, "no_adapter"
    return cast(leaf.materialize()) - cast(leaf.frozen_base()), None
  if path not in init:
    raise ValueError(f"esd_type='cul': {path!r} is missing from init_params")
  return cast(_merged(leaf)) - cast(_merged(init[path])), None


def _skipped_record(path, layer, shape, reason, config):
  nan = float("nan")
  n = int(min(shape))
  return EsdRecord(path, layer, tuple(shape), n, n, nan, nan, nan, nan, 0, {k: nan for k in METRICS}, reason,
                   config)


def analyze(params: Params, config=None, *, init_params: Optional[Params] = None) -> list[EsdRecord]:
  """Fits every analysed matrix of `params`; one record per matrix and per slice of a stacked kernel.

  Records come in network order (`network_order_key`): the embedding (when analysed), then block by block
  q, k, v, o, gate, up, down (stacked slices and `.../<l>/...` paths alike), then other matrices outside the
  blocks, then `lm_head`. A matrix with fewer than `eigs_thresh` eigenvalues keeps no alpha
  (`skipped='eigs_thresh'`); the first/last exclusions keep their fit but are marked `skipped='first'` /
  `'last'` so no schedule uses them. They pick among the fitted matrices, or with `exclude_before_thresh`
  among all analysed ones (TempBalance drops its first and last rows before the eigenvalue filter).
  """
  config = EsdConfig.make(config)
  init = None
  if config.esd_type == "cul":
    if init_params is None:
      raise ValueError("esd_type='cul' needs init_params (the weights W_0 the update is measured from)")
    init = dict(_leaves(init_params))
  keyed = []
  for order, (path, leaf) in enumerate(_leaves(params)):
    if not _selected(path, leaf, config):
      continue
    stacked = is_stacked(path, config)
    shape = (leaf.frozen_base() if peft.is_adapter(leaf) else leaf).shape
    slices = range(shape[0]) if stacked else [None]
    layer_of = (lambda l: l) if stacked else (lambda l: block_of(path))
    sort_key = lambda l: network_order_key(path, layer_of(l), config) + (order,)
    mat_shape = tuple(shape[-2:])
    if min(mat_shape) < config.eigs_thresh:
      w, reason = None, "eigs_thresh"
    else:
      w, reason = _matrix(path, leaf, config, init)
    if reason is not None:
      keyed += [(sort_key(l), _skipped_record(path, layer_of(l), mat_shape, reason, config)) for l in slices]
      continue
    fits = fit_matrices(w, config)
    for l in slices:
      f = {k: v if l is None else v[l] for k, v in fits.items()}
      alpha = float(f["alpha"])
      keyed.append((sort_key(l), EsdRecord(
          path=path, layer=layer_of(l), shape=mat_shape, n_evals=int(min(mat_shape)),
          n_valid=int(f["n_valid"]), alpha=alpha, D=float(f["D"]), xmin=float(f["xmin"]),
          sigma=float(f["sigma"]), n_tail=int(f["n_tail"]), metrics={k: float(f[k]) for k in METRICS},
          skipped=None if np.isfinite(alpha) else "fit_failed", config=config)))
  records = [r for _, r in sorted(keyed, key=lambda kr: kr[0])]
  if config.exclude_before_thresh:
    candidates = list(range(len(records)))
  else:
    candidates = [i for i, r in enumerate(records) if r.skipped is None]
  for flag, reason in ((config.remove_first, "first"), (config.remove_last, "last")):
    if flag and candidates:
      i = candidates.pop(0 if reason == "first" else -1)
      if records[i].skipped is None:
        records[i] = dataclasses.replace(records[i], skipped=reason)
  return records


def block_alphas(records, num_blocks: Optional[int] = None) -> np.ndarray:
  """[num_blocks] mean alpha over the scheduled matrices of each block (NaN for a block with none)."""
  by_block: dict[int, list[float]] = {}
  for r in records:
    if r.skipped is None and r.layer is not None:
      by_block.setdefault(r.layer, []).append(r.alpha)
  if num_blocks is None:
    num_blocks = max(by_block, default=-1) + 1
  out = np.full(num_blocks, np.nan)
  for b, alphas in by_block.items():
    if b < num_blocks:
      out[b] = np.mean(alphas)
  return out


def summary(records) -> dict:
  """Scalars for a metrics logger: mean alpha over the records no schedule skips, and counts."""
  used = [r.alpha for r in records if r.skipped is None]
  return {"htsr/alpha_mean": float(np.mean(used)) if used else float("nan"),
          "htsr/num_fitted": len(used), "htsr/num_skipped": len(records) - len(used)}


def _leaf_of(params, path):
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=peft.is_adapter)
  for p, x in flat:
    if peft.path_str(p) == path:
      return x
  raise KeyError(path)


def record_spectrum(params, record, config: EsdConfig, init_params=None) -> np.ndarray:
  """The ascending eigenvalues the record was fitted on (the same matrix, slice and precision)."""
  leaf = _leaf_of(params, record.path)
  init = None
  if config.esd_type == "cul":
    init = {record.path: _leaf_of(init_params, record.path)}
  w, why = _matrix(record.path, leaf, config, init)
  if w is None:
    raise ValueError(f"{record.path}: no matrix to plot ({why})")
  if is_stacked(record.path, config):
    w = w[record.layer]
  return np.asarray(esd(w, config.precision), np.float64)
