"""The data-driven adapter initialisations as a host hook: `config.peft.init=eva | lora_ga` runs EVA or
LoRA-GA on a few training batches before the first step (`init_params`, before the trainable/frozen split).

    --config.peft.init=eva --config.peft.data_init.batches=8 --config.peft.data_init.eva_rho=2.0 \
        --config.peft.data_init.eva_tau=0.99
    --config.peft.init=lora_ga --config.peft.data_init.batches=8 --config.peft.data_init.lora_ga_gamma=16

The batches are the first `calib_batches` of the run's training stream (its own seed, so the trainer's
stream is untouched). EVA counts the inputs at tokens with a loss weight (PEFT's `use_label_mask`), LoRA-GA
takes the gradient of the run's loss. LoRA-GA moves s A B out of the base: the hook marks the frozen tree as
mutated, so the trainer checkpoints the residual base.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import data as data_lib
import hooks
import losses
import peft
from train_lib import evaluate as eval_lib
from train_lib import train

DATA_INITS = ("eva", "lora_ga")


def _init_name(config) -> str:
  pc = config.get("peft")
  return (pc.get("init") or "") if pc is not None and pc.get("method") else ""


def calibration_batches(config, n: int):
  tokenizer = data_lib.get_tokenizer(config.data)
  ds = data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                            seq_len=int(config.seq_len), seed=config.seed)
  return [{k: jnp.asarray(v) for k, v in eval_lib.to_model_batch(b).items()}
          for b in itertools.islice(iter(ds), n)]


def _flat(batch, key):
  x = batch[key]
  return x.reshape((-1,) + x.shape[2:])


@hooks.register_hook("data_init", enabled=lambda config: _init_name(config) in DATA_INITS, order=-10)
def data_init(config, model) -> hooks.HostHook:
  name = _init_name(config)
  opts = dict(config.peft.get("data_init", None) or {})
  n = int(opts.get("batches", 8))

  def eva(params, rng):
    del rng
    batches = []
    for b in calibration_batches(config, n):
      seg = _flat(b, "segment_ids") if "segment_ids" in b else jnp.ones(_flat(b, "inputs").shape, jnp.int32)
      mask = (seg != 0) & (_flat(b, "loss_mask") > 0) if "loss_mask" in b else seg != 0
      batches.append({"inputs": _flat(b, "inputs"), "segment_ids": seg, "eva_mask": mask})
    forward = lambda p, b: model.apply(p, b["inputs"], segment_ids=b["segment_ids"], head=False)
    params, ranks = peft.eva_init(params, forward, batches, rho=float(opts.get("eva_rho", 2.0)),
                                  tau=float(opts.get("eva_tau", 0.99)), whiten=bool(opts.get("eva_whiten", False)))
    logging.info("EVA ranks: %s", {f"{p}[{i}]": r for (p, i), r in ranks.items()})
    return params

  def lora_ga(params, rng):
    del rng
    entry = losses.get(config.loss.name)
    def loss_fn(p, batch):
      frozen = jax.tree.map(lambda _: None, p)
      return train.loss_and_metrics(p, frozen, None, batch, None, model=model, loss_entry=entry,
                                    loss_cfg=config.loss)[0]
    return peft.lora_ga_init(params, loss_fn, calibration_batches(config, n),
                                gamma=float(opts.get("lora_ga_gamma", 16.0)))

  return hooks.HostHook(init_params=eva if name == "eva" else lora_ga, mutates_frozen=name == "lora_ga")
