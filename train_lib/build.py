"""Everything a run is built from, and rebuilt from a workdir: the model and its parameters (placed straight
into their shardings), the transforms of the parameters (adapters, the loss's own parameters, host hooks),
the trainable/frozen split, and `load_trained` for the eval, export and diagnose tasks.

    model, params = build.build_model(config, tokenizer, mesh)          # sharded from the start
    params, run_hooks = build.transform_params(config, model, params)
    trainable, frozen = build.split_trainable(params)
    config, model, params, tokenizer = build.load_trained(workdir)     # a finished (or running) run
    ref_params = build.reference_soup(config.reference.soup, mesh)      # a weight-space soup of runs
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import data as data_lib
import hooks
import losses
import models
import optim
import diagnostics  # noqa: F401  (registers its host hooks)
import merging
import peft
from train_lib import checkpoint as ckpt_lib
from train_lib import sharding as shd

CONFIG_FILE = "config.json"
LOSS_PARAMS = "loss_params"    # the top-level key of the parameters a loss trains
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TrainState(NamedTuple):
  step: jax.Array        # () int32
  params: Any            # trainable part of the parameters (None where frozen)
  opt_state: Any
  rng: jax.Array         # (2,) uint32


# =====================================================================================================
# The config of a run
# =====================================================================================================
def with_defaults(config) -> ml_collections.ConfigDict:
  """`config` with what it leaves implicit made explicit: the tokenizer of `model.hf_path` when
  `data.tokenizer` is unset and that directory holds one. Saved as the run's config.json."""
  hf = config.model.get("hf_path")
  if hf and config.data.get("tokenizer") is None and any(
      os.path.exists(os.path.join(hf, f)) for f in _TOKENIZER_FILES):
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer = hf
  return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the workdir's newest checkpoints were written with: the newest of configs/NNNN.json (one
  per start), else config.json (the first)."""
  path = os.path.join(workdir, CONFIG_FILE)
  cfg = ckpt_lib.latest_config(workdir)
  if cfg is None:
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
  return ml_collections.ConfigDict(cfg)


# =====================================================================================================
# The model and its parameters
# =====================================================================================================
def _model_overrides(mc) -> dict:
  chunk = mc.get("logits_chunk", None)
  return dict(dtype=mc.get("dtype", "float32"), param_dtype=mc.get("param_dtype", "float32"),
              remat=mc.get("remat", "none"), scan_layers=mc.get("scan_layers", True),
              attention_impl=mc.get("attention_impl", None),
              **({} if chunk is None else {"logits_chunk": int(chunk)}))


def place(params, dtype, mesh=None):
  """Host (numpy) or device arrays -> device arrays of `dtype`, each put straight into its sharding on
  `mesh` (every device receives only its shard; nothing is first gathered on one device)."""
  dtype = jnp.dtype(dtype)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(dtype), params)
  if mesh is None:
    return jax.tree.map(jnp.asarray, host)
  return jax.device_put(host, shd.tree_shardings({"params": host}, mesh)["params"])


def build_model(config, tokenizer, mesh=None) -> tuple[models.Decoder, Any]:
  """The model and its initial (pre-trained or random) parameters, sharded on `mesh` when given."""
  mc = config.model
  overrides = _model_overrides(mc)
  if mc.get("init_workdir"):      # start from an earlier run of this project (e.g. SFT before DPO)
    _, model, params, _ = load_trained(mc.init_workdir, mesh=mesh)
    params = peft.merge(params)     # its adapters, if any, become part of the new base
    params = {k: v for k, v in params.items() if k != LOSS_PARAMS}
    cfg = model.config.replace(**overrides)
    return models.Decoder(cfg), place(params, cfg.param_dtype, mesh)
  if mc.get("hf_path"):
    cfg, params = models.load_hf(mc.hf_path)     # host numpy arrays
    cfg = cfg.replace(**overrides)
    return models.Decoder(cfg), place(params, cfg.param_dtype, mesh)
  extra = dict(mc.get("overrides", {}) or {})
  cfg = models.preset(mc.name, vocab_size=tokenizer.vocab_size, **overrides, **extra)
  model = models.Decoder(cfg)
  key = jax.random.PRNGKey(config.seed)
  if mesh is None:
    return model, model.init(key)
  abstract = jax.eval_shape(model.init, key)
  sh = shd.tree_shardings({"params": abstract}, mesh)["params"]
  return model, jax.jit(model.init, out_shardings=sh)(key)


def transform_params(config, model, params):
  """The base params with adapters (`config.peft`), the parameters the loss trains (under `loss_params`,
  when its registration declares some) and the parameter transforms of the run's host hooks. Returns
  (params, [(name, HostHook)])."""
  params = peft.apply_config(params, config.get("peft"), rng=jax.random.PRNGKey(config.seed + 2))
  entry = losses.get(config.loss.name)
  width = model.config.hidden_size
  frozen_path = entry.frozen_model_path(config.loss)
  if frozen_path:     # the loss's parameters act on the frozen model's hidden states: its width
    width = frozen_model_config(frozen_path).hidden_size
  loss_params = entry.init_params(config.loss, width, jax.random.PRNGKey(config.seed + 4))
  if loss_params is not None:
    params = {**params, LOSS_PARAMS: loss_params}
  run_hooks = hooks.active_hooks(config, model)
  for _, hook in run_hooks:
    params = hook.init_params(params, jax.random.PRNGKey(config.seed + 3))
  return params, run_hooks


def frozen_model_config(path: str) -> models.DecoderConfig:
  """The model config of a Hugging Face checkpoint directory, without reading its weights."""
  with open(os.path.join(path, "config.json")) as f:
    return models.config_from_hf(json.load(f))


def frozen_loss_model(config, tokenizer=None, mesh=None):
  """(model, params) of the frozen model the loss reads (`losses.FrozenModel`, e.g. DPO-Kernels' encoder),
  or (None, None). It runs on the batch's token ids, so it must share the run's tokenizer: a vocabulary
  smaller than the tokenizer's is refused here."""
  path = losses.get(config.loss.name).frozen_model_path(config.loss)
  if not path:
    return None, None
  cfg, params = models.load_hf(path)
  if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the loss's frozen model {path!r} has a vocabulary of {cfg.vocab_size} tokens, the run's "
                     f"tokenizer {tokenizer.vocab_size}: it reads the batch's token ids, so it must share the "
                     f"tokenizer")
  return models.Decoder(cfg), place(params, cfg.param_dtype, mesh)


def split_trainable(params):
  """peft.split, with loss parameters always trainable (an adapter run freezes plain arrays)."""
  trainable, frozen = peft.split(params)
  if LOSS_PARAMS in params:
    trainable = {**trainable, LOSS_PARAMS: params[LOSS_PARAMS]}
    frozen = {**frozen, LOSS_PARAMS: jax.tree.map(lambda _: None, params[LOSS_PARAMS])}
  return trainable, frozen


def init_state(tx, trainable, seed: int) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(seed + 1))


# =====================================================================================================
# Rebuilding a run from its workdir
# =====================================================================================================
def load_trained(workdir: str, step: int | None = None, mesh=None):
  """(config, model, params, tokenizer) of the run in `workdir`, at its latest (or given) checkpoint;
  restored straight into the shardings of `mesh` when given."""
  config = load_config(workdir)
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build_model(config, tokenizer, mesh)
  params, run_hooks = transform_params(config, model, params)
  save_frozen = any(h.mutates_frozen for _, h in run_hooks)
  trainable, frozen = split_trainable(params)
  tx, _ = optim.from_config(config, trainable)
  abstract = jax.eval_shape(lambda t: init_state(tx, t, 0), trainable)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  abstract_frozen = jax.eval_shape(lambda f: f, frozen) if save_frozen else None
  if mesh is not None:
    abstract = ckpt_lib.abstract(abstract, TrainState(**shd.tree_shardings(abstract._asdict(), mesh)))
    if abstract_frozen is not None:
      abstract_frozen = ckpt_lib.abstract(abstract_frozen, shd.tree_shardings({"params": abstract_frozen},
                                                                               mesh)["params"])
  state, _, saved_frozen = ckpt.restore(step, abstract, abstract_frozen)
  ckpt.close()
  if save_frozen:
    frozen = saved_frozen
  params = peft.combine(state.params, frozen)
  return config, model, params, tokenizer


# =====================================================================================================
# A reference model from other runs
# =====================================================================================================
def soup_runs(soup) -> list[str]:
  """`config.reference.soup` ("RUN1,RUN2" or a sequence) -> the list of workdirs."""
  if isinstance(soup, str):
    return [s.strip() for s in soup.split(",") if s.strip()]
  return [str(s) for s in (soup or ())]


def reference_soup(soup, mesh=None, dtype=None):
  """The uniform weight-space average (`merging.linear`) of the runs in `soup` (their adapters merged, loss
  parameters dropped): a frozen reference for the losses that read one, as SALSA builds it from SFT runs.
  Placed into the parameters' shardings on `mesh` when given."""
  runs = soup_runs(soup)
  if not runs:
    raise ValueError("reference soup: no runs given")
  trees = []
  for run in runs:
    _, _, params, _ = load_trained(run)
    params = peft.merge(params)
    trees.append(jax.device_get({k: v for k, v in params.items() if k != LOSS_PARAMS}))
  soup_params = merging.linear(None, trees)
  leaves = jax.tree.leaves(trees[0])
  return place(soup_params, dtype or leaves[0].dtype, mesh)
