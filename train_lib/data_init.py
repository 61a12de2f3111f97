"""The data-driven adapter initialisations as a host hook: `config.peft.init=NAME` for any init registered with
`peft.register_data_init` (EVA, LoRA-GA, ...) runs it on a few training batches before the first step
(`init_params`, before the trainable/frozen split).

    --config.peft.init=eva --config.peft.data_init.batches=8 --config.peft.data_init.eva_rho=2.0 \
        --config.peft.data_init.eva_tau=0.99
    --config.peft.init=lora_ga --config.peft.data_init.batches=8 --config.peft.data_init.lora_ga_gamma=16

The batches are the first `batches` of the run's training stream (its own seed, so the trainer's stream is
untouched). `token_mask` marks the real tokens with a loss weight (PEFT's `use_label_mask`); `loss_fn` is the
run's loss. An init that rewrites frozen weights (LoRA-GA's residual base) declares it, and the hook marks
the frozen tree as mutated, so the trainer checkpoints it.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

import data as data_lib
import hooks
import losses
import peft
from train_lib import evaluate as eval_lib
from train_lib import train


def _init_name(config) -> str:
  pc = config.get("peft")
  return (pc.get("init") or "") if pc is not None and pc.get("method") else ""


def calibration_batches(config, n: int):
  """The first n training batches as model batches, [B, K, T] preference rows flattened to [B K, T]."""
  tokenizer = data_lib.get_tokenizer(config.data)
  ds = data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                            seq_len=int(config.seq_len), seed=config.seed)
  return [{k: jnp.asarray(v) for k, v in eval_lib.to_model_batch(b).items()}
          for b in itertools.islice(iter(ds), n)]


def _with_token_mask(batch):
  flat = lambda k: batch[k].reshape((-1,) + batch[k].shape[2:]) if batch[k].ndim > 2 else batch[k]
  seg = flat("segment_ids") if "segment_ids" in batch else jnp.ones(flat("inputs").shape, jnp.int32)
  mask = (seg != 0) & (flat("loss_mask") > 0) if "loss_mask" in batch else seg != 0
  return dict(batch, flat_inputs=flat("inputs"), flat_segment_ids=seg, token_mask=mask)


@hooks.register_hook("data_init", enabled=lambda config: peft.is_data_init(_init_name(config)), order=-10)
def data_init(config, model) -> hooks.HostHook:
  entry = peft.get_data_init(_init_name(config))
  opts = dict(config.peft.get("data_init", None) or {})
  loss_entry = losses.get(config.loss.name)

  def forward(p, b):
    return model.apply(p, b["flat_inputs"], segment_ids=b["flat_segment_ids"], head=False)

  def loss_fn(p, batch):
    frozen = jax.tree.map(lambda _: None, p)
    return train.loss_and_metrics(p, frozen, None, batch, None, model=model, loss_entry=loss_entry,
                                  loss_cfg=config.loss)[0]

  def run(params, rng):
    batches = [_with_token_mask(b) for b in calibration_batches(config, int(opts.get("batches", 8)))]
    return entry.fn(params, peft.Calibration(batches, forward, loss_fn, rng), opts)

  return hooks.HostHook(init_params=run, mutates_frozen=entry.mutates_base)
