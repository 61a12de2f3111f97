"""Rebuilds a trained model from a workdir: the config it ran with, the base parameters, and the trainable
part from the latest checkpoint. Shared by the eval, export and diagnose tasks."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

import data as data_lib
import peft
from train_lib import checkpoint as ckpt_lib
from train_lib import train as train_mod

CONFIG_FILE = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: int | None = None):
  """(config, model, params, tokenizer) of the run in `workdir`, at its latest (or given) checkpoint."""
  config = load_config(workdir)
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = train_mod.build_model(config, tokenizer)
  params, hooks = train_mod.transform_params(config, model, params)
  save_frozen = any(h.mutates_frozen for h in hooks)
  trainable, frozen = train_mod.split_trainable(params)
  tx, _ = train_mod.build_optimizer(config, trainable)
  abstract = jax.eval_shape(lambda t: train_mod.TrainState(
      jax.numpy.zeros((), jax.numpy.int32), t, tx.init(t), jax.random.PRNGKey(0)), trainable)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  abstract_frozen = jax.eval_shape(lambda f: f, frozen) if save_frozen else None
  state, _, saved_frozen = ckpt.restore(step, abstract, abstract_frozen)
  ckpt.close()
  if save_frozen:
    frozen = saved_frozen
  params = peft.combine(state.params, frozen)
  return config, model, params, tokenizer
