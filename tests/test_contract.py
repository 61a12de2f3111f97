"""One contract over every registry: each registered adapter, optimizer and loss runs one train step through
the trainer's own pieces (build -> transform -> split -> optimizer -> jitted `train_step`) on the tiny model,
gives a finite loss and moves the trainable parameters. A newly registered method is covered here without
writing a test for it.
"""
import functools

import jax
import numpy as np
import pytest

import data as data_lib
import losses
import models
import optim
import peft
from configs import dpo, dpo_kernels, precompute, sft
from train_lib import build, evaluate, sharding
from train_lib import train as train_mod
from train_lib.tasks import run_task

KIND_DATA = {"sft": None, "pairwise": "pairwise", "listwise": "listwise", "unpaired": "unpaired"}


def _one_step(config):
  tokenizer = data_lib.get_tokenizer(config.data)
  mesh = sharding.make_mesh(config.get("mesh"))
  model, params = build.build_model(config, tokenizer, mesh)
  params, run_hooks = build.transform_params(config, model, params)
  trainable, frozen = build.split_trainable(params)
  tx, schedule = optim.from_config(config, trainable)
  entry = losses.get(config.loss.name)
  ref = None
  if "reference" in entry.needs_for(config.loss) and not peft.has_adapters(params):
    ref = jax.tree.map(lambda x: x, params)
  state = build.init_state(tx, trainable, config.seed)
  for _, hook in run_hooks:
    if hook.refresh is not None:
      state, frozen, *_ = hook.refresh(0, state, frozen, tx)
  it = iter(data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                                 seq_len=config.seq_len, seed=0))
  batch = evaluate.to_model_batch(next(it))
  batch.update({field: np.float32(0.0) for _, field in entry.carry})
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(functools.partial(train_mod.train_step, model=model, tx=tx, schedule=schedule,
                                   loss_entry=entry, loss_cfg=config.loss))
  state, metrics = step(state, frozen, ref, batch)
  moved = sum(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).sum())
              for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))
  return float(metrics["loss"]), moved


def _smoke(cfg_module=sft, arg="model=tiny,smoke"):
  config = cfg_module.get_config(arg)
  config.batch_size = 4
  config.data.train_size = 32        # the built-in tasks make 50k problems by default
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  return config


@pytest.mark.parametrize("name", peft.adapter_names())
def test_every_adapter_trains_one_step(name):
  config = _smoke()
  config.peft.method = name
  config.peft.targets = "all-linear"
  config.peft.rank = 4
  loss, moved = _one_step(config)
  assert np.isfinite(loss) and moved > 0


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_every_optimizer_trains_one_step(name):
  config = _smoke()
  config.optim.name = name
  if name == "hft":
    config.optim.grad_clip_norm = 0.0
  for section in ("galore", "fira", "lift"):
    config.optim[section].rank = 4 if section != "lift" else 1
  config.optim.lift.filter_rank = 4
  if name == "lora_pro":                        # corrects LoRA factors; needs an adapter
    config.peft.method, config.peft.targets, config.peft.rank = "lora", "all-linear", 4
  loss, moved = _one_step(config)
  assert np.isfinite(loss) and moved > 0


def _precomputed_aligned_data(config, tmp_path):
  """PoFT's data: the built-in SFT records with the tiny model's own log-probs precomputed into them by the
  `precompute` task (as one aligned model), read back one example per row."""
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build.build_model(config, tokenizer, sharding.make_mesh(config.get("mesh")))
  models.save_hf(str(tmp_path / "aligned"), model.config, jax.device_get(params))
  pc = precompute.get_config()
  pc.reference, pc.data, pc.seq_len, pc.splits = str(tmp_path / "aligned"), config.data, config.seq_len, "train"
  run_task(pc, str(tmp_path / "data"))
  config.data.update(dict(source="jsonl", path=str(tmp_path / "data" / "{split}.jsonl"), tokenizer="char",
                          train_size=None, aligned_logps_field="aligned_logps", packing="none"))
  return config


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_trains_one_step(name, tmp_path):
  entry = losses.get(name)
  if entry.kind == "sft":
    config = _smoke()
  else:
    config = _smoke(dpo, f"model=tiny,smoke,kind={KIND_DATA[entry.kind]},loss={name}")
    if name == "dpo_kernels":
      config = _smoke(dpo_kernels)
  config.loss.name = name
  if name == "poft":        # PoFT's aligned log-probs come from the data
    config = _precomputed_aligned_data(config, tmp_path)
  loss, moved = _one_step(config)
  assert np.isfinite(loss) and moved > 0
