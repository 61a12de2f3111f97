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
as OwLore's `np.random.choice`), and their weights are gathered into the slots.

**Optimizer state across samplings** (`sampling.state`):

* `persist` (the default, as OwLore's and LMFlow's torch code): torch creates a block's Adam moments, GaLore
  projector and per-parameter `step` the first time the block gets a gradient and keeps them while it is
  frozen (an unsampled block has no gradient, so its step and state do not move). Here the slots' optimizer
  runs once per sampled block (`per_block`: a loop over the gamma slots, so each block has its own step
  count and GaLore's refresh stays a real `lax.cond`) on its row of a store with one row per block
  (`PerBlockState.blocks`, every leaf `[L, ...]`, counts `[L]`), read and written in place. A block sampled
  again continues its moments, projector and count where they stopped, so GaLore's projector refresh fires
  on the block's own count (with K = 50 and gap 100, every second draw of a block), not at every draw.
* `reset`: every part of the optimizer state that serves only slots (their moments, GaLore projectors and
  the step count of their own optimizer) is re-initialised by `tx.init` at every draw, while the
  always-trainable leaves keep theirs, and so does the learning-rate schedule. A newly sampled block starts
  like a block sampled for the first time (fresh projector, Adam's bias correction restarted).

Memory of `persist`: the store is a device array sized for all L blocks from step 0, which is the bound the
torch state reaches once every block has been drawn (torch grows towards it draw by draw). We keep it on
the device rather than on the host: the shapes stay static, the store is donated and updated in place by
the jitted step, it is sharded and checkpointed with the rest of the optimizer state (a resumed run
continues every block's state exactly), and no host transfer sits between steps. With GaLore rank 256 on
Llama-2-7B the store is 32 blocks x 62 MiB (bf16; `benchmarks/results/owlore_memory.md`); with a full-rank
optimizer (LISA's Adam) it is the full fine-tuning state, so `configs/lisa.py` keeps `reset`.
The slots' optimizer is built at learning rate 1 inside the store and the schedule is applied after it on
the global step (torch's scheduler is global too): `decay_updated_weights`, whose update is not linear in
the learning rate, is refused there.

**OwLore with LoRA** (`sampling.use_lora`, OwLore's `--use_lora`): the adapters of `config.peft` on the
decoder blocks train only while their block is sampled. The stacked adapter factors `[L, ...]` stay whole
(they are small) and the per-block optimizer gathers the sampled rows of their gradient, updates them and
leaves every other row, its parameters and its state untouched; the base weights, and as with HF PEFT the
embeddings and head, stay frozen. (The global-norm clipping still sees the unsampled rows' gradients,
where torch has none: set `optim.grad_clip_norm=0` to rule that out.)

In both modes the slots (or the adapters under `layers`) need an optimizer of their own, one no other leaf
uses: `config.optim.rules` must send `layers/.*/slots` to it, e.g.
`(("layers/.*/slots", "galore"), (".*", "adamw"))`.
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

import data as data_lib
import diagnostics
import hooks
import peft
from peft import place_like, resample, sample_layers

PROB_MODES = ("uniform", "owl", "owl_reverse", "increase", "decrease")
SCORE_FREE_MODES = ("uniform", "increase", "decrease")
METHODS = ("lisa", "owlore", "owlore_alpha", "hft")
STATE_MODES = ("persist", "reset")


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


class PerBlockState(NamedTuple):
  idx: jax.Array     # [gamma] int32: the blocks trained now (written between steps by the sampling hook)
  blocks: Any        # the inner optimizer's state of every block: each leaf [L, ...], its counts [L]


def per_block(inner: optax.GradientTransformation, num_blocks: int, gamma: int, sliced: bool = True
              ) -> optax.GradientTransformation:
  """`inner` run on each sampled block with that block's own state, kept for all `num_blocks` blocks.

  Every leaf of the tree `inner` sees is per block along axis 0: with `sliced` the gamma slots of the
  sampled blocks `idx` (`SampledLayers.slots`), else the whole stack of L blocks (adapter factors), whose
  rows `idx` are gathered here and whose other rows get a zero update. Each step

  .. math::  (u_b, s_b) \leftarrow \mathrm{inner.update}(g_b, s_b, w_b) \quad \text{for } b \in idx,

  one block at a time (a `fori_loop`, so a `lax.cond` inside `inner`, GaLore's refresh, stays a branch),
  while the rows of the other blocks stay as they are. `inner` must not depend on parameter values at init (Adam,
  GaLore: zeros), since every row is initialised from the first block's template.
  """
  def init_fn(params):
    first = jax.tree.map(lambda x: x[0], params)
    blocks = jax.vmap(lambda _: inner.init(first))(jnp.arange(num_blocks))
    return PerBlockState(jnp.arange(gamma, dtype=jnp.int32), blocks)

  def update_fn(updates, state, params=None):
    idx = state.idx
    row = lambda t, k: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), t)
    put = lambda t, v, k: jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), k, 0), t, v)

    # A loop over the sampled blocks that reads and writes one row of the store at a time: XLA updates the
    # donated store in place, where a gather of the gamma rows and a scatter back would copy it.
    def body(i, carry):
      blocks, out = carry
      b = idx[i]
      at = i if sliced else b        # the block's row in the updates: its slot, or its place in the stack
      u, new = inner.update(row(updates, at), row(blocks, b), None if params is None else row(params, at))
      return put(blocks, new, b), put(out, u, at)

    out = updates if sliced else jax.tree.map(jnp.zeros_like, updates)   # sliced: every row is rewritten
    blocks, out = jax.lax.fori_loop(0, gamma, body, (state.blocks, out))
    return out, PerBlockState(idx, blocks)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_per_block(x) -> bool:
  return isinstance(x, PerBlockState)


def set_blocks(opt_state, idx, fresh=None):
  """`opt_state` with every `PerBlockState` training the blocks `idx`; with `fresh` (= tx.init of the
  trainable tree) the rows of `idx` are re-initialised too (`state=reset` with adapters)."""
  idx = jnp.asarray(idx, jnp.int32)
  def one(x, f=None):
    if not _is_per_block(x):
      return x
    blocks = x.blocks if f is None else jax.tree.map(lambda s, z: s.at[idx].set(z[idx]), x.blocks, f.blocks)
    return PerBlockState(idx, blocks)
  if fresh is None:
    return jax.tree.map(one, opt_state, is_leaf=_is_per_block)
  return jax.tree.map(one, opt_state, fresh, is_leaf=_is_per_block)


def per_block_optimizers(config, trainable) -> dict:
  """{optimizer name: factory(build, schedule) -> transform} for `optim.make`: the optimizer of the sampled
  blocks wrapped in `per_block`, when `config.sampling` keeps per-block state (`state=persist`, or
  `use_lora`); {} otherwise. `build(learning_rate)` builds that optimizer from its config section."""
  sampling = config.get("sampling")
  if not sampling or sampling.get("method") not in ("lisa", "owlore", "owlore_alpha"):
    return {}
  nodes = [x for x in jax.tree.leaves(trainable, is_leaf=peft.is_sampled) if peft.is_sampled(x)]
  block_paths = [p for p in peft.flatten(trainable) if p.startswith("layers/")]
  if nodes:
    num_blocks, sliced = nodes[0].num_blocks, True
  else:
    leaves = [x for p, x in peft.flatten(trainable).items() if p.startswith("layers/")]
    if not leaves or not sampling.get("use_lora"):
      return {}
    num_blocks, sliced = int(leaves[0].shape[0]), False
  sc = SamplingConfig.from_config(config, num_blocks)
  if sliced and sc.state == "reset":
    return {}
  rules = [tuple(r) for r in (config.optim.get("rules", None) or ())]
  labels = {_first_label(p, rules, config.optim.name) for p in block_paths}
  for name in labels:
    if name is not None and (config.optim.get(name) or {}).get("decay_updated_weights"):
      raise ValueError(f"config.optim.{name}.decay_updated_weights: with per-block optimizer state the "
                       f"learning rate is applied after the block's optimizer; the decayed-updated-weight "
                       f"order is not linear in it. Set it False or config.sampling.state='reset'")

  def factory(build, schedule):
    return optax.chain(per_block(build(1.0), num_blocks, sc.gamma, sliced), optax.scale_by_schedule(schedule))
  return {name: factory for name in labels if name is not None}


# =========================================================================================================
# Config
# =========================================================================================================
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  method: str
  gamma: int = 2                  # blocks trained at a time
  interval_steps: int = 20        # K: steps between resamplings (HFT: stage length)
  prob_mode: str = "uniform"
  state: str = "persist"          # persist: each block's optimizer state kept across draws (OwLore's code) | reset
  use_lora: bool = False          # train the adapters of config.peft on the sampled blocks (OwLore's use_lora)
  # OwLore: outlier threshold M of the LOD. 13: OwLore's code reads `metric_cache/llama2_ratio_13.txt` (the
  # repo ships `llama2_7b_ratio_13.txt`: 32 values from 0.018 to 0.295, in percent) and has no code that
  # computes it; in OWL's code the number in that slot is `--Hyper_m`, i.e. M. So 13 is read from the file
  # name, which OWL's scripts never use (they use 5 for LLaMA; its argparse default is 3).
  outlier_M: float = 13.0
  # OwLore's calibration set (OWL's `get_loaders("c4", nsamples=128, seed=0, seqlen=2048)`): rows of
  # `calibration_seq_len` tokens from `calibration_data`, overrides of `config.data` (e.g. {source: jsonl,
  # path: c4.jsonl, format: fields, prompt_field: "", response_field: text}); None / {} = the training data.
  calibration_data: Optional[dict] = None
  calibration_split: str = "train"
  calibration_sequences: int = 128
  calibration_seq_len: int = 2048
  calibration_batch_size: int = 8   # rows per forward pass of the calibration (memory, not the result)
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
    _check(c.state in STATE_MODES, f"state={c.state!r}; valid: {STATE_MODES}")
    _check(isinstance(c.use_lora, bool), f"use_lora={c.use_lora!r} must be a bool")
    _check(c.outlier_M > 0, f"outlier_M={c.outlier_M} must be > 0")
    for name in ("calibration_sequences", "calibration_seq_len", "calibration_batch_size"):
      v = getattr(c, name)
      _check(isinstance(v, int) and v >= 1, f"{name}={v!r} must be an int >= 1")
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


def check_slot_optimizer(optim_cfg, param_paths: Sequence[str], slot_suffix: str = "/slots") -> None:
  """The slots (with `use_lora`: the trainable leaves under `layers/`, passed with `slot_suffix=""`) must
  have an optimizer of their own: its state, step count included, is per block (persist) or reset."""
  rules = [tuple(r) for r in (optim_cfg.get("rules", None) or ())]
  slot_paths = [p + slot_suffix for p in param_paths if p.startswith("layers/")]
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
        f"layer sampling keeps the slots' optimizer state, step count included, per block (or resets it at "
        f"every resampling), so the slots need an optimizer that no other parameter uses; {sorted(shared)} "
        f"serves both; {hint}")


def _param_paths(model) -> list[str]:
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return [peft.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]


# =========================================================================================================
# Host hooks
# =========================================================================================================
def calibration_data_config(config, sc: SamplingConfig):
  """`config.data` with `sc.calibration_data`'s overrides (None values inherit the training data's)."""
  import ml_collections
  data_cfg = ml_collections.ConfigDict(config.data.to_dict() if hasattr(config.data, "to_dict")
                                       else dict(config.data))
  for k, v in (sc.calibration_data or {}).items():
    if v is not None:
      data_cfg[k] = v
  return data_cfg


def calibration_batches(config, sc: SamplingConfig) -> list:
  """`calibration_sequences` rows of `calibration_seq_len` tokens of the calibration data, in batches of
  `calibration_batch_size` rows (the last one cut to the count), as trainer batches."""
  data_cfg = calibration_data_config(config, sc)
  tokenizer = data_lib.get_tokenizer(data_cfg)
  bs = min(sc.calibration_batch_size, sc.calibration_sequences)
  it = iter(data_lib.get_dataset(data_cfg, sc.calibration_split, tokenizer=tokenizer, batch_size=bs,
                                 seq_len=sc.calibration_seq_len, seed=config.seed + 5, train=True))
  out, left = [], sc.calibration_sequences
  while left > 0:
    batch = {k: np.asarray(v) for k, v in next(it).items() if k in ("inputs", "positions", "segment_ids")}
    T = batch["inputs"].shape[-1]
    batch = {k: v.reshape(-1, T)[:left] for k, v in batch.items()}   # preference [B, K, T] -> rows
    out.append(batch)
    left -= batch["inputs"].shape[0]
  return out


def outlier_scores(config, model, params, sc: SamplingConfig) -> np.ndarray:
  """OwLore's D_l on the calibration set (`calibration_batches`; OWL's is 128 x 2048 tokens of C4)."""
  return diagnostics.outlier_ratios(model, params, calibration_batches(config, sc), sc.outlier_M)


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
  if sc.use_lora:
    check_slot_optimizer(config.optim, _adapter_paths(config, model), slot_suffix="")
  else:
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
    logging.info("layer sampling (%s, gamma=%d, every %d steps, state %s%s): block scores %s, p %s", sc.method,
                 sc.gamma, sc.interval_steps, sc.state, ", LoRA" if sc.use_lora else "",
                 None if scores is None else np.round(scores, 4), np.round(p, 4))
    if sc.use_lora:
      return params        # the adapters stay whole; the optimizer trains the sampled blocks' rows
    return sample_layers(params, draw(seed, 0, p, sc.gamma))

  def refresh(step, state, frozen, tx):
    idx = draw(seed, step, probs["p"], sc.gamma)
    if sc.use_lora:
      fresh = jax.jit(tx.init)(state.params) if sc.state == "reset" else None
      opt_state = place_like(set_blocks(state.opt_state, idx, fresh), state.opt_state)
      return state._replace(opt_state=opt_state), frozen
    trainable, frozen = resample(state.params, frozen, idx)
    if sc.state == "persist":
      if not any(_is_per_block(x) for x in jax.tree.leaves(state.opt_state, is_leaf=_is_per_block)):
        raise ValueError("config.sampling.state='persist' needs the per-block optimizer of optim.from_config "
                         "(optim.make(..., per_block=per_block_optimizers(config, trainable)))")
      opt_state = set_blocks(state.opt_state, idx)
    else:
      opt_state = reset_slot_state(state.opt_state, jax.jit(tx.init)(trainable))
    return state._replace(params=trainable, opt_state=place_like(opt_state, state.opt_state)), frozen

  return hooks.HostHook(every=sc.interval_steps, init_params=init_params, refresh=refresh,
                        mutates_frozen=not sc.use_lora)


def _adapter_paths(config, model) -> list[str]:
  """The trainable leaves of the model under `config.peft` (use_lora); refuses a run without adapters on
  the decoder blocks."""
  def trainable():
    params = peft.apply_config(model.init(jax.random.PRNGKey(0)), config.get("peft"), rng=jax.random.PRNGKey(0))
    return peft.split(params)[0]
  paths = list(peft.flatten(jax.eval_shape(trainable)))
  if not any(p.startswith("layers/") for p in paths):
    raise ValueError("config.sampling.use_lora: config.peft puts no adapter on the decoder blocks (layers/...); "
                     "e.g. configs/owlore.py:lora=True")
  return paths


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
