r"""Layer sampling (LISA, OwLore and an HT-SR variant) and Half Fine-Tuning, with static shapes.

**LISA** (Pan et al., *LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning*, arXiv 2403.17919; `OptimalScale/LMFlow: src/lmflow/pipeline/utils/lisa_trainer.py`): the
embeddings, the final norm and the head always train; of the L decoder blocks only gamma train at a time,
redrawn uniformly without replacement every K steps. **OwLore / OWS** (Li et al., arXiv 2405.18380;
`pixeli99/OwLore: src/lmflow/pipeline/finetuner.py`) draws block l with probability

.. math::  p_l = D_l / \textstyle\sum_k D_k

where :math:`D_l` is the block's outlier ratio (`diagnostics.outlier_ratios`, computed once on the
pre-trained weights), and projects the sampled blocks' gradients with GaLore. **owlore_alpha** takes
:math:`p_l \propto 1/\alpha_l` with :math:`\alpha_l` the block's mean HT-SR exponent
(`diagnostics.block_alphas`): the paper reads outlier-rich layers as heavy-tailed (low alpha), so this needs
no calibration data. We could not confirm that reading at small scale: on an 8-block, 192-wide model trained
from scratch for 800 steps on the sort task (one seed), the Spearman correlation of 1/alpha_l with D_l was
-0.83 at M = 3 and -0.19 at M = 5 (D_l grows with depth already at initialisation, alpha does not); treat
`owlore_alpha` as an ablation until it is checked on a pre-trained LLM.

Probability modes (OwLore's `lisa_prob_mode`): `uniform`, `owl` (p ∝ score), `owl_reverse`
(p ∝ max(p) − p), `increase` (p ∝ l + 1) and `decrease` (p ∝ L − l), l = 0..L−1 (shifted by one from
"p ∝ l" so that every block can be drawn).

**Slots.** Every leaf under the stacked `layers` becomes a `SampledLayers` node holding the whole stack
`base [L, ...]` (frozen), the sampled blocks' weights `slots [gamma, ...]` (the only trainable part) and their
indices `idx [gamma]`. Gradients and optimizer state therefore exist for gamma blocks plus the embeddings,
final norm and head. The model's layer scan slices `base` and a per-layer slot position and closes over the
slots (`peft.scan_split`); each layer's matmul picks its slot or its frozen weight under `lax.cond` inside
`jax.checkpoint`, so no `[L, ...]` copy of the weights and no `[L, ...]` weight gradient is ever built (a
`stop_gradient(base).at[idx].set(slots)` before the scan costs both), and unsampled layers skip their weight
gradient.

**Resampling** runs on the host every `interval_steps` steps (step 0 included), between jitted steps, with
every shape unchanged (no recompilation): the slots are written back into `base`, the new blocks are drawn
with `np.random.default_rng((seed, step)).choice(L, gamma, replace=False, p=p)` (deterministic in seed and
step, so a resumed run redraws what the uninterrupted one drew; numpy's sequential draw without replacement,
as OwLore's `np.random.choice`), their weights are gathered into the slots, and the slots' optimizer state is
**reset**: every part of the optimizer state that serves only slots (their moments, GaLore projectors, and
the step count of their own optimizer) is re-initialised by `tx.init`, while the always-trainable leaves keep
theirs, and so does the learning-rate schedule (its count is not the slots'). A newly sampled block thus
starts like a block sampled for the first time in the torch reference (GaLore computes a fresh projector at
its first step and Adam restarts its bias correction). The torch references instead keep a block's state
across samplings (METHODS A3 pitfalls 3-4), which needs state for every block ever sampled; reset keeps the
persistent state at gamma blocks. Because the step count must restart
with the moments, the slots need an optimizer of their own: `config.optim.rules` must send
`layers/.*/slots` to an optimizer no other leaf uses, e.g. `(("layers/.*/slots", "galore"), (".*", "adamw"))`.

**HFT** (Hui et al., *HFT: Half Fine-Tuning for Large Language Models*, arXiv 2404.18466): full fine-tuning
in which each stage of `interval_steps` steps freezes a random half of the parameter matrices. There is no
official code; we use the rule of METHODS C5 (a third-party reading, unverified against the paper): in every
block 2 of the 4 attention matrices {q, k, v, o} train, and 2 of the 3 MLP matrices {gate, up, down} train in
a random floor(L/2) of the blocks and 1 of 3 in the others; a bias follows its kernel; embeddings, norms and
the head always train. The mask (bool [L] per layer kernel) lives in the `hft` transform's state and is
redrawn on the host per stage; frozen matrices get their gradients zeroed before the inner optimizer (and
before `clip_norm`, so clipping sees only the trained half, as torch does with `requires_grad=False`), exactly
zero updates, and an unchanged inner state (the inner state's parameter-shaped trees keep their old values
where frozen; the shared step count advances).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from peft._apply import adapter_node
from peft._core import Adapter, dot, is_adapter, path_str
from peft._registry import HostHook, get_optimizer, register_hook, register_optimizer

PROB_MODES = ("uniform", "owl", "owl_reverse", "increase", "decrease")
SCORE_FREE_MODES = ("uniform", "increase", "decrease")
METHODS = ("lisa", "owlore", "owlore_alpha", "hft")


# =========================================================================================================
# The slot node
# =========================================================================================================
@adapter_node
class SampledLayers(Adapter):
  """A stacked leaf under `layers` of which only the blocks `idx` train (as `slots`)."""
  base: jax.Array     # [L, ...] every block's weight; the sampled blocks' entries are stale until write-back
  slots: jax.Array    # [gamma, ...] the sampled blocks' weights (trainable)
  idx: jax.Array      # [gamma] int32, ascending: the sampled blocks

  trainable_fields = ("slots",)
  trains_base = True

  def materialize(self) -> jax.Array:
    return jax.lax.stop_gradient(self.base).at[self.idx].set(self.slots.astype(self.base.dtype))

  def frozen_base(self) -> jax.Array:
    # There is no separate frozen weight: the stack is trained in place. (`has_adapters` is False for these
    # nodes, so the trainer's reference model is a frozen copy, never this.)
    return self.materialize()

  def dot(self, x):
    return dot(x, self.materialize())

  def scan_parts(self):
    L, gamma = self.base.shape[0], self.idx.shape[0]
    pos = jnp.full((L,), -1, jnp.int32).at[self.idx].set(jnp.arange(gamma, dtype=jnp.int32))
    return _LayerSlot(self.base, pos, None), self.slots


@jax.checkpoint
def _slot_dot(x, base, pos, slots):
  # Recomputed in the backward pass, so the chosen weight is not saved per layer; the cond skips the weight
  # gradient of an unsampled layer.
  def sampled():
    return dot(x, jax.lax.dynamic_index_in_dim(slots, jnp.maximum(pos, 0), keepdims=False))
  return jax.lax.cond(pos >= 0, sampled, lambda: dot(x, jax.lax.stop_gradient(base)))


@adapter_node
class _LayerSlot(Adapter):
  """One layer of a `SampledLayers` stack inside the layer scan."""
  base: jax.Array              # [...] this layer's frozen weight
  pos: jax.Array               # () int32: its slot, or -1 when not sampled
  slots: Optional[jax.Array]   # [gamma, ...] all slots (closed over by the scan body)

  trains_base = True

  def scan_bind(self, closed):
    bound = self.replace(slots=closed)
    # Matrices go through `peft.dot`; norm scales and biases are used as arrays.
    return bound if self.base.ndim >= 2 else bound.materialize()

  def materialize(self):
    slot = jax.lax.dynamic_index_in_dim(self.slots, jnp.maximum(self.pos, 0), keepdims=False)
    return jnp.where(self.pos >= 0, slot.astype(self.base.dtype), jax.lax.stop_gradient(self.base))

  def dot(self, x):
    return _slot_dot(x, self.base, self.pos, self.slots)


def is_sampled(x) -> bool:
  return isinstance(x, SampledLayers)


def sample_layers(params, idx) -> Any:
  """Wraps every array under `params["layers"]` in a `SampledLayers` node training the blocks `idx`."""
  idx = jnp.asarray(np.sort(np.asarray(idx)), jnp.int32)

  def wrap(path, x):
    if is_adapter(x):
      raise ValueError(f"layer sampling trains whole blocks; {path_str(path)!r} is already an adapter node "
                       f"({type(x).__name__}): sampling over adapters is not supported")
    return SampledLayers(base=x, slots=jnp.take(x, idx, axis=0), idx=idx)

  layers = jax.tree_util.tree_map_with_path(wrap, params["layers"], is_leaf=is_adapter)
  return {**params, "layers": layers}


def sampled_blocks(params_or_frozen) -> np.ndarray:
  """The blocks the slots hold now ([gamma] int)."""
  nodes = [l for l in jax.tree.leaves(params_or_frozen, is_leaf=is_sampled) if is_sampled(l)]
  if not nodes:
    raise ValueError("no SampledLayers nodes in the tree")
  return np.asarray(jax.device_get(nodes[0].idx))


# =========================================================================================================
# Probabilities and draws
# =========================================================================================================
def layer_probs(mode: str, num_layers: int, scores: Optional[Sequence[float]] = None) -> np.ndarray:
  """p [L] for a probability mode; `owl` / `owl_reverse` need per-block scores (outlier ratios, 1/alpha)."""
  L = num_layers
  if mode not in PROB_MODES:
    raise ValueError(f"prob_mode={mode!r}; valid: {PROB_MODES}")
  if mode == "uniform":
    w = np.ones(L)
  elif mode == "increase":
    w = np.arange(1, L + 1, dtype=np.float64)
  elif mode == "decrease":
    w = np.arange(L, 0, -1, dtype=np.float64)
  else:
    if scores is None:
      raise ValueError(f"prob_mode={mode!r} needs per-block scores")
    s = np.asarray(scores, np.float64)
    if s.shape != (L,) or not np.all(np.isfinite(s)) or np.any(s < 0):
      raise ValueError(f"block scores must be {L} finite non-negative values, got {s}")
    if s.sum() == 0:
      logging.warning("every block score is 0: sampling uniformly")
      s = np.ones(L)
    w = s / s.sum()
    if mode == "owl_reverse":
      w = w.max() - w
      if w.sum() == 0:      # all equal: reversing leaves nothing
        w = np.ones(L)
  return w / w.sum()


def draw(seed: int, step: int, p: np.ndarray, gamma: int) -> np.ndarray:
  """gamma distinct blocks (ascending int32), a function of (seed, step) only."""
  rng = np.random.default_rng((int(seed), int(step)))
  return np.sort(rng.choice(len(p), size=gamma, replace=False, p=p)).astype(np.int32)


# =========================================================================================================
# Host-side resampling
# =========================================================================================================
@jax.jit
def _write_back(trainable, frozen, new_idx):
  is_leaf = lambda x: x is None or is_sampled(x)

  def one(t, f):
    if not is_sampled(t):
      return f
    base = f.base.at[f.idx].set(t.slots.astype(f.base.dtype))
    return f.replace(base=base, idx=new_idx)
  frozen = jax.tree.map(one, trainable, frozen, is_leaf=is_leaf)
  trainable = jax.tree.map(lambda t, f: t.replace(slots=jnp.take(f.base, f.idx, axis=0)) if is_sampled(t) else t,
                           trainable, frozen, is_leaf=is_leaf)
  return trainable, frozen


def resample(trainable, frozen, idx):
  """(trainable, frozen) with the slots written back into the bases and the blocks `idx` gathered.
  Every leaf keeps its shape, dtype and sharding."""
  t, f = _write_back(trainable, frozen, jnp.asarray(idx, jnp.int32))
  return _like(t, trainable), _like(f, frozen)


def _like(new, old):
  """`new` placed with the shardings of `old` (leaf by leaf), so the jitted step sees the same inputs."""
  def put(n, o):
    sharding = getattr(o, "sharding", None)
    return jax.device_put(n, sharding) if sharding is not None else n
  return jax.tree.map(put, new, old)


def _one_level(x):
  leaves, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda z: z is not x)
  return leaves, treedef


def _is_slot_optimizer_state(x) -> bool:
  """The state of one transform that sees only slots: it holds slot nodes, its other leaves are scalars,
  and one of those is its own (direct) step count. (A schedule's count sits in a state without slot nodes
  and is kept, so the learning-rate schedule never restarts.)"""
  leaves = jax.tree.leaves(x, is_leaf=is_sampled)
  if not any(is_sampled(l) for l in leaves) or any(np.ndim(l) for l in leaves if not is_sampled(l)):
    return False
  children, treedef = _one_level(x)
  return not jax.tree_util.treedef_is_leaf(treedef) and any(
      not is_sampled(c) and hasattr(c, "shape") and np.ndim(c) == 0 for c in children)


def reset_slot_state(old, fresh):
  """The optimizer state `old` with every part that serves only slots taken from `fresh` (= tx.init of the
  new trainable tree): slot nodes, and whole states of transforms that see only slots, their step counts
  included (Adam's bias correction, GaLore's projector refresh). Everything else (the always-trainable
  leaves' moments and counts, schedule counts) is kept."""
  if is_sampled(old) or _is_slot_optimizer_state(old):
    return fresh
  children, treedef = _one_level(old)
  if jax.tree_util.treedef_is_leaf(treedef) or not children:
    return old
  fresh_children = treedef.flatten_up_to(fresh)
  return treedef.unflatten([reset_slot_state(o, f) for o, f in zip(children, fresh_children)])


# =========================================================================================================
# Config
# =========================================================================================================
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  method: str
  gamma: int = 2                  # blocks trained at a time
  interval_steps: int = 20        # K: steps between resamplings (HFT: stage length)
  prob_mode: str = "uniform"
  outlier_M: float = 5.0          # OwLore: outlier threshold M of the LOD
  calibration_batches: int = 4    # OwLore: training batches for the LOD's activation statistics
  eigs_thresh: int = 50           # owlore_alpha: matrices with fewer eigenvalues are left out of block alphas

  @classmethod
  def from_config(cls, config, num_layers: int) -> "SamplingConfig":
    """From `config.sampling`, validated (a bad value raises at once, naming the valid ones)."""
    sc = config.sampling.to_dict() if hasattr(config.sampling, "to_dict") else dict(config.sampling)
    names = {f.name for f in dataclasses.fields(cls)}
    _check(not set(sc) - names, f"unknown fields {sorted(set(sc) - names)}; valid: {sorted(names)}")
    c = cls(**sc)
    _check(c.method in METHODS, f"method={c.method!r}; valid: {METHODS}")
    _check(c.method == "hft" or (isinstance(c.gamma, int) and 1 <= c.gamma <= num_layers),
           f"gamma={c.gamma!r} must be an int in [1, {num_layers}] (the model has {num_layers} decoder blocks)")
    _check(isinstance(c.interval_steps, int) and c.interval_steps >= 1,
           f"interval_steps={c.interval_steps!r} must be an int >= 1")
    _check(c.prob_mode in PROB_MODES, f"prob_mode={c.prob_mode!r}; valid: {PROB_MODES}")
    _check(c.method != "lisa" or c.prob_mode in SCORE_FREE_MODES,
           f"lisa takes prob_mode in {SCORE_FREE_MODES}; score-based modes are methods owlore / owlore_alpha")
    _check(c.outlier_M > 0, f"outlier_M={c.outlier_M} must be > 0")
    _check(isinstance(c.calibration_batches, int) and c.calibration_batches >= 1,
           f"calibration_batches={c.calibration_batches!r} must be an int >= 1")
    return c


def _check(cond, msg):
  if not cond:
    raise ValueError(f"config.sampling: {msg}")


def _first_label(path: str, rules, default: str):
  for rx, v in rules:
    if re.fullmatch(rx, path):
      return v
  return default


def check_slot_optimizer(optim_cfg, param_paths: Sequence[str]) -> None:
  """The slots must have an optimizer of their own (their state, step count included, is reset)."""
  rules = [tuple(r) for r in (optim_cfg.get("rules", None) or ())]
  slot_paths = [p + "/slots" for p in param_paths if p.startswith("layers/")]
  other_paths = [p for p in param_paths if not p.startswith("layers/")]
  slot_labels = {_first_label(p, rules, optim_cfg.name) for p in slot_paths}
  other_labels = {_first_label(p, rules, optim_cfg.name) for p in other_paths}
  hint = ("set config.optim.rules = ((r'layers/.*/slots', 'adam'), ('.*', 'adamw')) (OwLore: 'galore' for "
          "the slots)")
  if None in slot_labels:
    raise ValueError(f"config.optim.rules freezes some slots (layers/.../slots -> None): nothing would train "
                     f"in the sampled blocks; {hint}")
  shared = slot_labels & other_labels
  if shared:
    raise ValueError(
        f"layer sampling resets the slots' optimizer state, step count included, at every resampling, so the "
        f"slots need an optimizer that no other parameter uses; {sorted(shared)} serves both; {hint}")


def _param_paths(model) -> list[str]:
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]


# =========================================================================================================
# Host hooks
# =========================================================================================================
def _calibration_batches(config, n: int) -> list:
  import data as data_lib  # pylint: disable=g-import-not-at-top  (data sits above peft)
  tokenizer = data_lib.get_tokenizer(config.data)
  it = iter(data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                                 seq_len=int(config.seq_len), seed=config.seed + 5))
  return [next(it) for _ in range(n)]


def outlier_scores(config, model, params, sc: SamplingConfig) -> np.ndarray:
  """OwLore's D_l on `calibration_batches` batches of the training data (OWL used C4)."""
  import diagnostics  # pylint: disable=g-import-not-at-top  (diagnostics imports peft)
  return diagnostics.outlier_ratios(model, params, _calibration_batches(config, sc.calibration_batches),
                                    sc.outlier_M)


def inverse_alpha_scores(params, num_layers: int, eigs_thresh: int = 50) -> np.ndarray:
  """1 / alpha_l with alpha_l the mean HT-SR exponent of block l's kernels (median xmin rule); a block
  without a fit gets the mean of the others."""
  import diagnostics  # pylint: disable=g-import-not-at-top
  records = diagnostics.analyze(params, diagnostics.EsdConfig(mode="median", eigs_thresh=eigs_thresh))
  alphas = diagnostics.block_alphas(records, num_layers)
  if not np.any(np.isfinite(alphas)):
    logging.warning("no block has an alpha fit (eigs_thresh=%d): sampling uniformly", eigs_thresh)
    return np.ones(num_layers)
  alphas = np.where(np.isfinite(alphas), alphas, np.nanmean(alphas))
  return 1.0 / alphas


def layer_sampling_hook(config, model, scores_fn: Optional[Callable] = None) -> HostHook:
  """The HostHook of LISA / OwLore: wraps the layers at init, resamples every `interval_steps` steps."""
  if (config.get("tempbalance") or {}).get("enabled"):
    raise ValueError("TempBalance with layer sampling is not supported (its multipliers are per block, the "
                     "slots are gamma blocks); disable config.tempbalance.enabled")
  L = model.config.num_layers
  sc = SamplingConfig.from_config(config, L)
  check_slot_optimizer(config.optim, _param_paths(model))
  seed = int(config.seed)
  probs = {}

  def init_params(params, rng):
    del rng  # draws are a function of (seed, step)
    scores = scores_fn(params, sc) if sc.prob_mode not in SCORE_FREE_MODES else None
    p = layer_probs(sc.prob_mode, L, scores)
    if np.count_nonzero(p) < sc.gamma:
      raise ValueError(f"prob_mode={sc.prob_mode!r} gives only {np.count_nonzero(p)} blocks a nonzero "
                       f"probability, fewer than gamma={sc.gamma}: {np.round(p, 4)}")
    probs["p"] = p
    logging.info("layer sampling (%s, gamma=%d, every %d steps): block scores %s, p %s", sc.method, sc.gamma,
                 sc.interval_steps, None if scores is None else np.round(scores, 4), np.round(p, 4))
    return sample_layers(params, draw(seed, 0, p, sc.gamma))

  def refresh(step, state, frozen, tx):
    idx = draw(seed, step, probs["p"], sc.gamma)
    trainable, frozen = resample(state.params, frozen, idx)
    fresh = jax.jit(tx.init)(trainable)
    opt_state = _like(reset_slot_state(state.opt_state, fresh), state.opt_state)
    return state._replace(params=trainable, opt_state=opt_state), frozen

  hook = HostHook(every=sc.interval_steps, init_params=init_params, refresh=refresh, mutates_frozen=True)
  return hook


@register_hook("lisa")
def _lisa_hook(config, model) -> HostHook:
  return layer_sampling_hook(config, model)


@register_hook("owlore")
def _owlore_hook(config, model) -> HostHook:
  return layer_sampling_hook(config, model, lambda params, sc: outlier_scores(config, model, params, sc))


@register_hook("owlore_alpha")
def _owlore_alpha_hook(config, model) -> HostHook:
  L = model.config.num_layers
  return layer_sampling_hook(config, model, lambda params, sc: inverse_alpha_scores(params, L, sc.eigs_thresh))


# =========================================================================================================
# HFT
# =========================================================================================================
class HFTState(NamedTuple):
  mask: optax.Params           # per leaf: bool [L] for a layer kernel/bias HFT may freeze, bool () elsewhere
  inner_state: optax.OptState


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_HFT_LEAF = re.compile(r"layers/(attn|mlp)/(\w+_proj)/(kernel|bias)")


def hft_selection(seed: int, step: int, num_layers: int) -> dict[str, np.ndarray]:
  """{matrix name: bool [L] trained} for the stage starting at `step` (the rule in the module docstring)."""
  rng = np.random.default_rng((int(seed), int(step)))
  L = num_layers
  out = {n: np.zeros(L, bool) for n in _ATTN + _MLP}
  two_mlp = np.zeros(L, bool)
  two_mlp[rng.choice(L, size=L // 2, replace=False)] = True
  for l in range(L):
    for n in rng.choice(len(_ATTN), size=2, replace=False):
      out[_ATTN[n]][l] = True
    for n in rng.choice(len(_MLP), size=2 if two_mlp[l] else 1, replace=False):
      out[_MLP[n]][l] = True
  return out


def hft_mask(params):
  """The initial HFTState mask of `params`: bool [L] ones for the stacked layer matrices HFT may freeze (and
  their biases), a scalar True elsewhere."""
  def one(path, x):
    if _HFT_LEAF.fullmatch(path_str(path)) is None or jnp.ndim(x) < 2:
      return jnp.ones((), bool)
    return jnp.ones(x.shape[:1], bool)
  return jax.tree_util.tree_map_with_path(one, params)


def redraw_mask(mask, selection: dict[str, np.ndarray]):
  """A mask of the same structure with the layer matrices' entries from `hft_selection`."""
  def one(path, m):
    match = _HFT_LEAF.fullmatch(path_str(path))
    return m if match is None or jnp.ndim(m) != 1 else jnp.asarray(selection[match.group(2)])
  return jax.tree_util.tree_map_with_path(one, mask)


def _select(mask, new, old):
  m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(new) - mask.ndim))
  return jnp.where(m, new, old)


def _keep_frozen(new, old, mask, params_def):
  """`new` inner state with its parameter-shaped trees set back to `old` where the mask is False."""
  if jax.tree.structure(new) == params_def:
    return jax.tree.map(
        lambda n, o, m: _select(m, n, o) if np.shape(n)[:np.ndim(m)] == np.shape(m) else n, new, old, mask)
  children, treedef = _one_level(new)
  if jax.tree_util.treedef_is_leaf(treedef) or not children:
    return new
  return treedef.unflatten([_keep_frozen(n, o, mask, params_def)
                            for n, o in zip(children, treedef.flatten_up_to(old))])


def hft(inner: optax.GradientTransformation, clip_norm: float = 0.0) -> optax.GradientTransformation:
  """Half fine-tuning around `inner`: masked matrices get zero gradients, zero updates and a frozen inner
  state. `clip_norm` > 0 clips the global norm of the masked gradient first. The mask starts all-True; the
  `hft` host hook redraws it per stage."""
  def init_fn(params):
    return HFTState(hft_mask(params), inner.init(params))

  def update_fn(updates, state, params=None):
    grads = jax.tree.map(lambda g, m: _select(m, g, jnp.zeros_like(g)), updates, state.mask)
    if clip_norm:
      norm = optax.global_norm(grads)
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip_norm / (norm + 1e-12)).astype(g.dtype), grads)
    out, inner_state = inner.update(grads, state.inner_state, params)
    out = jax.tree.map(lambda u, m: _select(m, u, jnp.zeros_like(u)), out, state.mask)
    inner_state = _keep_frozen(inner_state, state.inner_state, state.mask, jax.tree.structure(updates))
    return out, HFTState(state.mask, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


@register_optimizer("hft")
def _hft_optimizer(learning_rate, cfg):
  inner = cfg.get("hft_inner", "adamw")
  if inner == "hft":
    raise ValueError("config.optim.hft_inner cannot be 'hft'")
  return hft(get_optimizer(inner)(learning_rate, cfg), clip_norm=cfg.get("hft_clip_norm", 0.0))


def set_hft_selection(opt_state, selection: dict[str, np.ndarray]):
  """opt_state with the mask of every HFTState inside redrawn (same shapes and shardings)."""
  is_hft = lambda x: isinstance(x, HFTState)
  return jax.tree.map(lambda s: s._replace(mask=_like(redraw_mask(s.mask, selection), s.mask)) if is_hft(s) else s,
                      opt_state, is_leaf=is_hft)


@register_hook("hft")
def _hft_hook(config, model) -> HostHook:
  L = model.config.num_layers
  sc = SamplingConfig.from_config(config, L)
  oc = config.optim
  names = {oc.name} | {r[1] for r in (oc.get("rules", None) or ())}
  _check("hft" in names, "method='hft' needs config.optim.name='hft' (its inner optimizer is "
         "config.optim.hft_inner), which holds the per-stage mask")
  _check(not oc.get("grad_clip_norm", 0.0), "with HFT set config.optim.grad_clip_norm=0 and clip with "
         "config.optim.hft_clip_norm instead: the clipping norm must see only the trained half")
  seed = int(config.seed)

  def refresh(step, state, frozen, tx):
    del tx
    selection = hft_selection(seed, step, L)
    return state._replace(opt_state=set_hft_selection(state.opt_state, selection)), frozen

  return HostHook(every=sc.interval_steps, init_params=lambda params, rng: params, refresh=refresh)
