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

**Slots** are adapter nodes (`peft/_slots.py`: `SampledLayers`).

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
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging

import data as data_lib
import diagnostics
import hooks
import peft
from peft import place_like, resample, sample_layers

PROB_MODES = ("uniform", "owl", "owl_reverse", "increase", "decrease")
SCORE_FREE_MODES = ("uniform", "increase", "decrease")
METHODS = ("lisa", "owlore", "owlore_alpha", "hft")


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
# Optimizer state across resamplings
# =========================================================================================================
def one_level(x):
  leaves, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda z: z is not x)
  return leaves, treedef


def _is_slot_optimizer_state(x) -> bool:
  """The state of one transform that sees only slots: it holds slot nodes, its other leaves are scalars,
  and one of those is its own (direct) step count. (A schedule's count sits in a state without slot nodes
  and is kept, so the learning-rate schedule never restarts.)"""
  leaves = jax.tree.leaves(x, is_leaf=peft.is_sampled)
  if not any(peft.is_sampled(l) for l in leaves) or any(np.ndim(l) for l in leaves if not peft.is_sampled(l)):
    return False
  children, treedef = one_level(x)
  return not jax.tree_util.treedef_is_leaf(treedef) and any(
      not peft.is_sampled(c) and hasattr(c, "shape") and np.ndim(c) == 0 for c in children)


def reset_slot_state(old, fresh):
  """The optimizer state `old` with every part that serves only slots taken from `fresh` (= tx.init of the
  new trainable tree): slot nodes, and whole states of transforms that see only slots, their step counts
  included (Adam's bias correction, GaLore's projector refresh). Everything else (the always-trainable
  leaves' moments and counts, schedule counts) is kept."""
  if peft.is_sampled(old) or _is_slot_optimizer_state(old):
    return fresh
  children, treedef = one_level(old)
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


def sampling_check(cond, msg):
  if not cond:
    raise ValueError(f"config.sampling: {msg}")


_check = sampling_check


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
  return [peft.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]


# =========================================================================================================
# Host hooks
# =========================================================================================================
def _calibration_batches(config, n: int) -> list:
  tokenizer = data_lib.get_tokenizer(config.data)
  it = iter(data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                                 seq_len=int(config.seq_len), seed=config.seed + 5))
  return [next(it) for _ in range(n)]


def outlier_scores(config, model, params, sc: SamplingConfig) -> np.ndarray:
  """OwLore's D_l on `calibration_batches` batches of the training data (OWL used C4)."""
  return diagnostics.outlier_ratios(model, params, _calibration_batches(config, sc.calibration_batches),
                                    sc.outlier_M)


def inverse_alpha_scores(params, num_layers: int, eigs_thresh: int = 50) -> np.ndarray:
  """1 / alpha_l with alpha_l the mean HT-SR exponent of block l's kernels (median xmin rule); a block
  without a fit gets the mean of the others."""
  records = diagnostics.analyze(params, diagnostics.EsdConfig(mode="median", eigs_thresh=eigs_thresh))
  alphas = diagnostics.block_alphas(records, num_layers)
  if not np.any(np.isfinite(alphas)):
    logging.warning("no block has an alpha fit (eigs_thresh=%d): sampling uniformly", eigs_thresh)
    return np.ones(num_layers)
  alphas = np.where(np.isfinite(alphas), alphas, np.nanmean(alphas))
  return 1.0 / alphas


def layer_sampling_hook(config, model, scores_fn: Optional[Callable] = None) -> hooks.HostHook:
  """The HostHook of LISA / OwLore: wraps the layers at init, resamples every `interval_steps` steps."""
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
    opt_state = place_like(reset_slot_state(state.opt_state, fresh), state.opt_state)
    return state._replace(params=trainable, opt_state=opt_state), frozen

  return hooks.HostHook(every=sc.interval_steps, init_params=init_params, refresh=refresh, mutates_frozen=True)


def sampling_hook(config, model) -> hooks.HostHook:
  """The host hook of `config.sampling.method`; an unknown method fails naming the valid ones (a typo must
  not leave every hook disabled and train all blocks silently)."""
  method = (config.get("sampling") or {}).get("method")
  if method not in METHODS:
    raise ValueError(f"config.sampling.method: unknown layer-sampling method {method!r}; valid: {METHODS}")
  return hooks.get_hook(method)(config, model)


def _method_is(name):
  return lambda config: (config.get("sampling") or {}).get("method") == name


@hooks.register_hook("lisa", enabled=_method_is("lisa"))
def _lisa_hook(config, model) -> hooks.HostHook:
  return layer_sampling_hook(config, model)


@hooks.register_hook("owlore", enabled=_method_is("owlore"))
def _owlore_hook(config, model) -> hooks.HostHook:
  return layer_sampling_hook(config, model, lambda params, sc: outlier_scores(config, model, params, sc))


@hooks.register_hook("owlore_alpha", enabled=_method_is("owlore_alpha"))
def _owlore_alpha_hook(config, model) -> hooks.HostHook:
  L = model.config.num_layers
  return layer_sampling_hook(config, model, lambda params, sc: inverse_alpha_scores(params, L, sc.eigs_thresh))
