"""The trainer: one jitted, sharded train step over a plain state; reads top to bottom.

    python main.py --config=configs/sft.py --workdir=/tmp/sft

Sections: pure functions (model outputs, loss) -> the train and eval steps -> setup helpers ->
`train_and_evaluate`, which resumes from the workdir. Projects that need another loop fork this file.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import data as data_lib
import diagnostics
import losses
import models
import peft
from peft._registry import get_hook
from train_lib import checkpoint as ckpt_lib
from train_lib import evaluate as eval_lib
from train_lib import metrics as metrics_lib
from train_lib import optim
from train_lib import sharding as shd
from train_lib import validate as validate_lib

class TrainState(NamedTuple):
  step: jax.Array        # () int32
  params: Any            # trainable part of the parameters (None where frozen)
  opt_state: Any
  rng: jax.Array         # (2,) uint32


class NonFiniteLossError(FloatingPointError):
  pass


# =====================================================================================================
# Pure functions
# =====================================================================================================
def _masked_mean(x, mask, axis):
  return (x * mask[..., None]).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)[..., None]


def model_outputs(model: models.Decoder, params, batch, needs=frozenset()) -> dict:
  """The `losses.Outputs` dict for a [B, K, T] batch: one forward pass over all B*K sequences.

  `needs` may also hold "log_sum_sq_probs" (per-token log sum_v p_v^2, WPO's weights)."""
  lead, T = batch["inputs"].shape[:-1], batch["inputs"].shape[-1]
  flat = lambda k: batch[k].reshape(-1, T) if batch.get(k) is not None else None
  # Without segment ids (unpacked, unpadded rows) the model takes the plain causal path (cuDNN flash).
  logits, hidden = model.apply(params, flat("inputs"), flat("positions"), flat("segment_ids"),
                               return_hidden=True)
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, flat("targets")[..., None], axis=-1)[..., 0]
  token_logps = target_logits - logz
  mask = flat("loss_mask").astype(jnp.float32)
  out = {"token_logps": token_logps, "mask": mask, "logps": (token_logps * mask).sum(-1),
         "lengths": mask.sum(-1)}
  if "logz" in needs:
    out["logz"] = logz
  if "embeddings" in needs:
    h = hidden.astype(jnp.float32)
    seg = flat("segment_ids")
    prompt_mask = (1.0 - mask) * (seg != 0 if seg is not None else 1.0)
    out["embeddings"] = _masked_mean(h, mask, 1)
    out["prompt_embeddings"] = _masked_mean(h, prompt_mask, 1)
  if "last_logits" in needs:
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    out["last_logits"] = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  if "logits" in needs:
    out["logits"] = logits
  if "log_sum_sq_probs" in needs:
    out["log_sum_sq_probs"] = jax.nn.logsumexp(2.0 * (logits - logz[..., None]), axis=-1)
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)


def loss_needs(loss_entry, loss_cfg) -> frozenset:
  needs = set(loss_entry.needs)
  if loss_cfg.get("use_weighting", False):
    needs.add("log_sum_sq_probs")
  return frozenset(needs)


def ranking_accuracy(logps, batch):
  """Fraction of ordered pairs (score_i > score_j, both real) with logp_i > logp_j. Pairs without
  scores are ordered chosen (index 0) over rejected (index 1)."""
  K = logps.shape[1]
  scores = batch.get("scores")
  if scores is None:
    scores = jnp.broadcast_to(-jnp.arange(K, dtype=jnp.float32), logps.shape)
  valid = batch.get("list_mask", jnp.ones_like(scores))
  better = (scores[:, :, None] > scores[:, None, :]) & (valid[:, :, None] > 0) & (valid[:, None, :] > 0)
  right = logps[:, :, None] > logps[:, None, :]
  return jnp.sum(better & right) / jnp.maximum(jnp.sum(better), 1)


def loss_and_metrics(trainable, frozen, ref_params, batch, rng, *, model, loss_entry, loss_cfg):
  params = peft.with_dropout_rng(peft.combine(trainable, frozen), rng)   # adapter dropout keys; None in eval
  needs = loss_needs(loss_entry, loss_cfg)
  if "loss_params" in params:     # parameters a loss trains (DPO-Kernels' kernel mixture)
    batch = {**batch, "hmk_params": params["loss_params"]}
  policy = model_outputs(model, params, batch, needs)
  reference = None
  if "reference" in needs:
    if "ref_logps" in batch:     # precomputed once into the data
      reference = {"logps": batch["ref_logps"]}
    else:
      ref = ref_params if ref_params is not None else peft.strip(params)
      reference = jax.lax.stop_gradient(model_outputs(model, ref, batch, needs))
  loss, metrics = loss_entry.fn(policy, reference, batch, loss_cfg)
  metrics = {"loss": loss, **metrics}
  if loss_entry.kind in ("pairwise", "listwise") and policy["logps"].shape[1] > 1:
    metrics["ranking_accuracy"] = ranking_accuracy(policy["logps"], batch)
  return loss, metrics


# =====================================================================================================
# Steps
# =====================================================================================================
def train_step(state: TrainState, frozen, ref_params, batch, *, model, tx, schedule, loss_entry, loss_cfg,
               grad_accum_steps: int = 1):
  """One optimizer step; with grad_accum_steps > 1 the batch is split into micro-batches along B."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_and_metrics, model=model, loss_entry=loss_entry, loss_cfg=loss_cfg), has_aux=True)

  if grad_accum_steps == 1:
    (_, metrics), grads = grad_fn(state.params, frozen, ref_params, batch, rng)
  else:
    micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

    def acc(carry, mb_i):
      g_sum, m_sum = carry
      mb, i = mb_i
      (_, m), g = grad_fn(state.params, frozen, ref_params, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m)), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    m_shape = jax.eval_shape(lambda: grad_fn(state.params, frozen, ref_params,
                                             jax.tree.map(lambda x: x[0], micro), rng)[0][1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics), _ = jax.lax.scan(acc, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum_steps)))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    metrics = jax.tree.map(lambda m: m / grad_accum_steps, metrics)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update({"grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
                  "param_norm": optax.global_norm(params), "lr": schedule(state.step)})
  return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def eval_step(trainable, frozen, ref_params, batch, *, model, loss_entry, loss_cfg):
  _, metrics = loss_and_metrics(trainable, frozen, ref_params, batch, None, model=model,
                                loss_entry=loss_entry, loss_cfg=loss_cfg)
  return metrics


# =====================================================================================================
# Setup
# =====================================================================================================
def build_optimizer(config, trainable):
  """The optax chain of `config.optim`, followed by TempBalance's layerwise multipliers when enabled."""
  tx, schedule = optim.make(config.optim, trainable, int(config.total_steps))
  if (config.get("tempbalance") or {}).get("enabled"):
    tx = peft.tempbalance(tx)
  return tx, schedule


def tempbalance_config(tb) -> peft.TempBalanceConfig:
  esd = getattr(diagnostics.EsdConfig, tb.get("esd_preset", "tempbalance"))(
      eigs_thresh=tb.get("eigs_thresh", 50))
  return peft.TempBalanceConfig(
      assign=tb.get("assign", "tb_linear_map"), granularity=tb.get("granularity", "layer"),
      lr_min_ratio=tb.get("lr_min_ratio", 0.5), lr_slope=tb.get("lr_slope", 1.0),
      sigmoid_min=tb.get("sigmoid_min", 2.0), sigmoid_max=tb.get("sigmoid_max", 1.0),
      exp_temp=tb.get("exp_temp", 10.0), normalize=tb.get("normalize", False), esd=esd)


def transform_params(config, model, params):
  """Adapters (`config.peft`), layer sampling (`config.sampling`) and the parameters a loss trains
  (`params["loss_params"]`: DPO-Kernels' kernel mixture) added to the base params."""
  params = peft.apply_config(params, config.get("peft"), rng=jax.random.PRNGKey(config.seed + 2))
  if config.loss.name == "dpo_kernels" and config.loss.get("kernel") == "hmk":
    params = {**params, "loss_params": losses.init_hmk_params(model.config.hidden_size,
                                                               jax.random.PRNGKey(config.seed + 4))}
  sampling = config.get("sampling") or {}
  hooks = [get_hook(sampling.method)(config, model)] if sampling.get("method") else []
  for hook in hooks:
    params = hook.init_params(params, jax.random.PRNGKey(config.seed + 3))
  return params, hooks


def split_trainable(params):
  """peft.split, with loss parameters always trainable (an adapter run freezes plain arrays)."""
  trainable, frozen = peft.split(params)
  if "loss_params" in params:
    trainable = {**trainable, "loss_params": params["loss_params"]}
    frozen = {**frozen, "loss_params": jax.tree.map(lambda _: None, params["loss_params"])}
  return trainable, frozen


def build_model(config, tokenizer) -> tuple[models.Decoder, Any]:
  """The model and its initial (pre-trained or random) parameters."""
  mc = config.model
  overrides = dict(dtype=mc.get("dtype", "float32"), param_dtype=mc.get("param_dtype", "float32"),
                   remat=mc.get("remat", "none"), scan_layers=mc.get("scan_layers", True),
                   attention_impl=mc.get("attention_impl", None))
  if mc.get("init_workdir"):      # start from an earlier run of this project (e.g. SFT before DPO)
    from train_lib import restore   # pylint: disable=g-import-not-at-top  (restore imports this module)
    _, model, params, _ = restore.load_trained(mc.init_workdir)
    params = peft.merge(params)     # its adapters, if any, become part of the new base
    params = {k: v for k, v in params.items() if k != "loss_params"}
    cfg = model.config.replace(**overrides)
    return models.Decoder(cfg), jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), params)
  if mc.get("hf_path"):
    cfg, params = models.load_hf(mc.hf_path)
    cfg = cfg.replace(**overrides)
    params = jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), params)
    return models.Decoder(cfg), params
  extra = dict(mc.get("overrides", {}) or {})
  cfg = models.preset(mc.name, vocab_size=tokenizer.vocab_size, **overrides, **extra)
  model = models.Decoder(cfg)
  return model, model.init(jax.random.PRNGKey(config.seed))


# =====================================================================================================
# train_and_evaluate
# =====================================================================================================
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint. Returns a summary dict."""
  validate_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  mesh = shd.make_mesh(config.get("mesh"))
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build_model(config, tokenizer)
  params, hooks = transform_params(config, model, params)
  save_frozen = any(h.mutates_frozen for h in hooks)
  trainable, frozen = split_trainable(params)
  total_steps = int(config.total_steps)
  tx, schedule = build_optimizer(config, trainable)
  tb = config.get("tempbalance") or {}
  loss_entry = losses.get(config.loss.name)
  ref_params = None
  if "reference" in loss_entry.needs and not peft.has_adapters(params):
    ref_params = jax.tree.map(jnp.copy, params)   # full fine-tuning: a frozen copy is the reference
  logging.info("model %s: %d params, %d trainable", model.config, peft.count(params), peft.count(trainable))

  # ---- state and shardings ----------------------------------------------------------------------------
  def init_state(trainable):
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable),
                      jax.random.PRNGKey(config.seed + 1))

  abstract_state = jax.eval_shape(init_state, trainable)
  state_sh = shd.tree_shardings(abstract_state._asdict(), mesh)
  state_sh = TrainState(**state_sh)
  frozen_sh = shd.tree_shardings({"params": frozen}, mesh)["params"]
  frozen = jax.device_put(frozen, frozen_sh)
  if ref_params is not None:
    ref_params = jax.device_put(ref_params, shd.tree_shardings({"params": ref_params}, mesh)["params"])
  state = jax.jit(init_state, out_shardings=state_sh)(jax.device_put(trainable, state_sh.params))
  repl = shd.replicated(mesh)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, loss_entry=loss_entry,
                        loss_cfg=config.loss, grad_accum_steps=int(config.optim.get("grad_accum_steps", 1))),
      donate_argnums=(0,), out_shardings=(state_sh, repl))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, loss_entry=loss_entry, loss_cfg=config.loss),
                    out_shardings=repl)

  # ---- data and checkpoint ----------------------------------------------------------------------------
  seq_len = int(config.seq_len)
  train_iter = iter(data_lib.get_dataset(config.data, "train", tokenizer=tokenizer,
                                         batch_size=config.batch_size, seq_len=seq_len, seed=config.seed))
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 2),
                               async_save=config.get("async_checkpoints", True))
  # Running loss state fed back each step (BCO's reward mean), checkpointed with the data position.
  carry = {field: 0.0 for _, field in loss_entry.carry}
  start = ckpt.latest_step()
  if start is not None:
    state, data_state, restored_frozen = ckpt.restore(
        start, ckpt_lib.abstract(state, state_sh),
        ckpt_lib.abstract(frozen, frozen_sh) if save_frozen else None)
    if save_frozen:
      frozen = restored_frozen
    carry = data_state.pop("loss_carry", carry)
    train_iter.set_state(data_state)
    logging.info("resumed from step %d", start)
  start = int(state.step)
  resumed_from = start if ckpt.latest_step() is not None else None

  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  summary_path = os.path.join(workdir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) and start else {}

  def run_eval(step, tag):
    params_now = peft.combine(state.params, frozen)
    res = eval_lib.evaluate(config, model, params_now, tokenizer,
                            functools.partial(eval_fn, state.params, frozen, ref_params), mesh)
    writer.write(step, {f"eval/{k}": v for k, v in res.items()})
    summary[tag] = res
    logging.info("eval@%d %s: %s", step, tag, res)
    return res

  if start == 0 and config.get("eval_before", True):
    res = run_eval(0, "before")
    print(f"[before training] " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)

  # ---- loop -------------------------------------------------------------------------------------------
  progress = metrics_lib.Progress(total_steps, start)
  pending = []                          # (step, data position, device metrics) not yet checked on host
  kind = config.data.get("pref_kind")
  seqs = (data_lib.num_sequences(kind, config.data.get("list_size", 4), config.data.get("unpaired_kl", True))
          if kind else 1)
  tokens_per_step = config.batch_size * seq_len * seqs
  t_last, steps_since = time.perf_counter(), 0
  log_every = int(config.get("log_every_steps", 10))

  def flush_pending():
    nonlocal t_last, steps_since
    if not pending:
      return
    fetched = jax.device_get([m for _, _, m in pending])
    for (s, pos, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(f"loss is {m['loss']} at step {s} (batch at data position {pos}); "
                                 f"the last checkpoint (step {ckpt.latest_step()}) is intact")
    s, _, _ = pending[-1]
    m = fetched[-1]
    dt = time.perf_counter() - t_last
    tps = tokens_per_step * steps_since / max(dt, 1e-9)
    writer.write(s + 1, {**m, "tokens_per_s": tps})
    progress.update(s + 1, float(m["loss"]), tps)
    t_last, steps_since = time.perf_counter(), 0
    pending.clear()

  def esd_refresh(step):
    """HT-SR alphas of the current weights -> TensorBoard, and (TempBalance) new layerwise multipliers."""
    nonlocal state
    params_now = jax.device_get(peft.combine(state.params, frozen))
    sched = peft.schedule(params_now, tb_config)
    alphas = diagnostics.block_alphas(sched.records, model.config.num_layers)
    writer.write(step, {f"alpha/block_{l}": a for l, a in enumerate(alphas) if np.isfinite(a)})
    if tb.get("enabled"):
      opt_state = peft.refresh_multipliers(state.opt_state, params_now, tb_config, sched=sched)
      state = state._replace(opt_state=jax.device_put(opt_state, state_sh.opt_state))

  tb_config = tempbalance_config(tb) if tb.get("esd_interval") else None
  # Gradient entanglement of chosen and rejected log-probs (pairwise data only), on demand.
  ent_every = int(config.get("entanglement_every_steps", 0) or 0) if kind == "pairwise" else 0
  entanglement_fn = jax.jit(functools.partial(diagnostics.entanglement, model, n_pairs=4)) if ent_every else None
  for step in range(start, total_steps):
    if tb_config is not None and step % tb.esd_interval == 0:
      esd_refresh(step)
    for hook in hooks:
      if step % hook.every == 0:
        state, frozen = hook.refresh(step, state, frozen, tx)
    pos = train_iter.get_state()
    host_batch = eval_lib.to_model_batch(next(train_iter))
    host_batch.update({k: np.float32(v) for k, v in carry.items()})
    batch = eval_lib.put_batch(host_batch, mesh)
    if ent_every and step % ent_every == 0:      # before the step: the gradients the step is about to use
      writer.write(step, jax.device_get(entanglement_fn(state.params, frozen, batch)))
    state, metrics = step_fn(state, frozen, ref_params, batch)
    if carry:    # a host sync per step, only for losses that carry state
      carry = {field: float(metrics[metric]) for metric, field in loss_entry.carry}
    pending.append((step, pos, metrics))
    steps_since += 1
    done = step + 1
    if done % log_every == 0 or done == total_steps:
      flush_pending()
    if config.get("eval_every_steps") and done % config.eval_every_steps == 0 and done != total_steps:
      run_eval(done, f"step_{done}")
    if done % int(config.get("checkpoint_every_steps", 1000)) == 0 or done == total_steps:
      flush_pending()
      ckpt.save(done, state, {**train_iter.get_state(), "loss_carry": carry}, force=done == total_steps,
                frozen=frozen if save_frozen else None)

  flush_pending()
  ckpt.close()
  if total_steps > start or "after" not in summary:
    res = run_eval(total_steps, "after")
    print(f"[after training]  " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
  writer.close()
  plot = metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path), os.path.join(workdir, "loss_curve.png"))
  summary.update(steps=total_steps, plot=plot)
  if resumed_from is not None:
    summary["resumed_from"] = resumed_from
  if jax.process_index() == 0:
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=2, default=float)
  summary["state"] = state
  summary["frozen"] = frozen
  return summary
