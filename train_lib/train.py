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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import data as data_lib
import losses
import optim
import peft
from train_lib import build
from train_lib import checkpoint as ckpt_lib
from train_lib import distributed
from train_lib import evaluate as eval_lib
from train_lib import metrics as metrics_lib
from train_lib import sharding as shd
from train_lib import validate as validate_lib
from train_lib.build import TrainState

model_outputs = losses.model_outputs   # the forward pass behind every loss (losses/_outputs.py)


class NonFiniteLossError(FloatingPointError):
  pass


# =====================================================================================================
# Pure functions
# =====================================================================================================
def loss_needs(loss_entry, loss_cfg) -> frozenset:
  return loss_entry.needs_for(loss_cfg)


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


def loss_and_metrics(trainable, frozen, ref_params, batch, rng, loss_frozen=None, *, model, loss_entry, loss_cfg,
                     frozen_model=None):
  params = peft.with_dropout_rng(peft.combine(trainable, frozen), rng)   # adapter dropout keys; None in eval
  needs = loss_entry.needs_for(loss_cfg)
  if loss_frozen is not None:   # a frozen model the loss reads (its registration's FrozenModel), same tokens
    spec = loss_entry.frozen_model
    batch = {**batch, spec.batch_key: jax.lax.stop_gradient(
        model_outputs(frozen_model, loss_frozen, batch, frozenset(spec.needs(loss_cfg))))}
  if build.LOSS_PARAMS in params:     # parameters the loss trains, where its registration says it reads them
    batch = {**batch, loss_entry.params.batch_key: params[build.LOSS_PARAMS]}
  with losses.collecting() as sown:   # auxiliary terms the model sows (LoRAMoE's balancing loss)
    policy = model_outputs(model, params, batch, needs)
  reference = None
  if "reference" in needs:
    if "ref_logps" in batch:     # precomputed once into the data
      reference = {"logps": batch["ref_logps"]}
    else:
      ref = ref_params if ref_params is not None else peft.strip(params)
      reference = jax.lax.stop_gradient(model_outputs(model, ref, batch, needs))
  loss, metrics = loss_entry.fn(policy, reference, batch, loss_cfg)
  loss, metrics = losses.add_aux_losses(loss, metrics, sown, batch, loss_cfg)   # + aux_weights[name] * term
  penalty = peft.regularizer(params)    # adapters' own loss terms (AdaLoRA's orthogonality); None: none
  if penalty is not None:
    loss, metrics = loss + penalty, {**metrics, "adapter_regularizer": penalty}
  metrics = {"loss": loss, **metrics}
  if loss_entry.kind in ("pairwise", "listwise") and policy["logps"].shape[1] > 1:
    metrics["ranking_accuracy"] = ranking_accuracy(policy["logps"], batch)
  return loss, metrics


# =====================================================================================================
# Steps
# =====================================================================================================
def train_step(state: TrainState, frozen, ref_params, batch, loss_frozen=None, *, model, tx, schedule,
               loss_entry, loss_cfg, grad_accum_steps: int = 1, frozen_model=None):
  """One optimizer step; with grad_accum_steps > 1 the batch is split into micro-batches along B."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_and_metrics, model=model, loss_entry=loss_entry, loss_cfg=loss_cfg,
                        frozen_model=frozen_model), has_aux=True)

  if grad_accum_steps == 1:
    (_, metrics), grads = grad_fn(state.params, frozen, ref_params, batch, rng, loss_frozen)
  else:
    micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

    def acc(carry, mb_i):
      g_sum, m_sum = carry
      mb, i = mb_i
      (_, m), g = grad_fn(state.params, frozen, ref_params, mb, jax.random.fold_in(rng, i), loss_frozen)
      return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m)), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    m_shape = jax.eval_shape(lambda: grad_fn(state.params, frozen, ref_params,
                                             jax.tree.map(lambda x: x[0], micro), rng, loss_frozen)[0][1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics), _ = jax.lax.scan(acc, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum_steps)))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    metrics = jax.tree.map(lambda m: m / grad_accum_steps, metrics)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update({"grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
                  "param_norm": optax.global_norm(params), "lr": schedule(state.step)})
  return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def eval_step(trainable, frozen, ref_params, batch, loss_frozen=None, *, model, loss_entry, loss_cfg,
              frozen_model=None):
  _, metrics = loss_and_metrics(trainable, frozen, ref_params, batch, None, loss_frozen, model=model,
                                loss_entry=loss_entry, loss_cfg=loss_cfg, frozen_model=frozen_model)
  return metrics


# =====================================================================================================
# train_and_evaluate
# =====================================================================================================
def batch_records(ds, before: dict, after: dict, limit: int = 8) -> str:
  """'file:line' of the records a training batch was made of (the stream from `before` to `after`)."""
  n = len(ds.examples)
  used = (int(after["epoch"]) - int(before["epoch"])) * n + int(after["position"]) - int(before["position"])
  idx = []
  for j in range(max(used, 0)):
    q = int(before["position"]) + j
    idx.append(int(ds.order(int(before["epoch"]) + q // n)[q % n]))
  report = getattr(ds, "report", None)
  names = [report.locate(i) if report is not None else f"example {i}" for i in idx]
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def report_skips(reports: dict, writer, step: int) -> dict:
  """Prints what the data readers left out, per split, and logs it as TensorBoard scalars
  (`data/<split>/skipped/<reason>`, `data/<split>/dropped/<reason>`). Returns the summary.json entry."""
  out = {}
  for split, report in reports.items():
    if report is None:
      continue
    d = report.as_dict() if hasattr(report, "as_dict") else {}
    out[split] = d
    scalars = {f"data/{split}/records": d.get("records", 0), f"data/{split}/skipped": d.get("skipped", 0)}
    scalars.update({f"data/{split}/skipped/{r}": n for r, n in d.get("by_reason", {}).items()})
    scalars.update({f"data/{split}/dropped/{r}": n for r, n in d.get("list_entries_dropped", {}).items()})
    writer.write(step, scalars)
    scalars.update({f"data/{split}/truncated/{r}": n for r, n in d.get("truncated", {}).items()})
    if d.get("skipped") or d.get("list_entries_dropped") or d.get("truncated"):
      print(f"data ({split}): {report.summary()}", flush=True)
      for reason, files in d.get("by_file", {}).items():
        for file, n in files.items():
          print(f"  {reason}: {n} in {file}", flush=True)
  return out


class HealthCheck:
  """Warnings for a run that trains nothing: a gradient norm of exactly 0, or a loss that has not moved
  (max - min < 1e-6 relative) over the last `window` steps (`config.stuck_loss_window`, 0 = off)."""

  def __init__(self, window: int):
    self.window, self.points, self.warnings, self.kinds = window, [], [], set()

  def _warn(self, kind, msg):
    if kind not in self.kinds:       # once per kind
      self.kinds.add(kind)
      self.warnings.append(msg)
      logging.warning(msg)
      print(f"WARNING: {msg}", flush=True)

  def update(self, step: int, metrics: dict):
    if "grad_norm" in metrics and float(metrics["grad_norm"]) == 0.0:
      self._warn("zero_grad", f"the gradient norm is 0 at step {step}: nothing is training (frozen parameters, a loss "
                 f"without a path to them, or a data with no loss tokens?)")
    if not self.window:
      return
    self.points.append((step, float(metrics["loss"])))
    self.points = [(s, l) for s, l in self.points if s > step - self.window]
    if self.points and step - self.points[0][0] >= self.window - 1 and len(self.points) > 1:
      ls = [l for _, l in self.points]
      if max(ls) - min(ls) <= 1e-6 * max(1.0, abs(ls[-1])):
        self._warn("stuck_loss", f"the loss has not moved over the last {self.window} steps (stuck at {ls[-1]:.6f} since "
                   f"step {self.points[0][0]})")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint. Returns a summary dict.

  The workdir is locked for the run (`checkpoint.WorkdirLock`); the config is compared with the one the
  workdir's checkpoints were written with before anything is written (`checkpoint.record_config`)."""
  config = build.with_defaults(config)
  validate_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:      # several hosts share one workdir: the first one holds the lock
    return _train(config, workdir)
  with ckpt_lib.WorkdirLock(workdir):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  history = ckpt_lib.record_config(workdir, json.loads(config.to_json()), config.get("resume_policy", "strict"),
                                   write=jax.process_index() == 0)
  mesh = shd.make_mesh(config.get("mesh"))
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build.build_model(config, tokenizer, mesh)
  params, run_hooks = build.transform_params(config, model, params)
  save_frozen = any(h.mutates_frozen for _, h in run_hooks)
  trainable, frozen = build.split_trainable(params)
  total_steps = int(config.total_steps)
  tx, schedule = optim.from_config(config, trainable)
  loss_entry = losses.get(config.loss.name)
  ref_params = None
  needs_reference = "reference" in loss_entry.needs_for(config.loss)
  soup = (config.get("reference") or {}).get("soup")
  if needs_reference and soup:    # a weight-space average of other runs is the frozen reference
    ref_params = build.reference_soup(soup, dtype=model.config.param_dtype)
  elif needs_reference and not peft.has_adapters(params):
    ref_params = jax.tree.map(jnp.copy, params)   # full fine-tuning: a frozen copy is the reference
  frozen_model, loss_frozen = build.frozen_loss_model(config, tokenizer, mesh)   # None unless the loss reads one
  logging.info("model %s: %d params, %d trainable", model.config, peft.count(params), peft.count(trainable))
  logging.info("host hooks: %s", [name for name, _ in run_hooks] or "none")

  # ---- state and shardings ----------------------------------------------------------------------------
  abstract_state = jax.eval_shape(lambda t: build.init_state(tx, t, config.seed), trainable)
  state_sh = TrainState(**shd.tree_shardings(abstract_state._asdict(), mesh))
  frozen_sh = shd.tree_shardings({"params": frozen}, mesh)["params"]
  frozen = jax.device_put(frozen, frozen_sh)
  if ref_params is not None:
    ref_params = jax.device_put(ref_params, shd.tree_shardings({"params": ref_params}, mesh)["params"])
  state = jax.jit(lambda t: build.init_state(tx, t, config.seed), out_shardings=state_sh)(
      jax.device_put(trainable, state_sh.params))
  repl = shd.replicated(mesh)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, loss_entry=loss_entry,
                        loss_cfg=config.loss, grad_accum_steps=int(config.optim.get("grad_accum_steps", 1)),
                        frozen_model=frozen_model),
      donate_argnums=(0,), out_shardings=(state_sh, repl))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, loss_entry=loss_entry, loss_cfg=config.loss,
                                      frozen_model=frozen_model), out_shardings=repl)

  # ---- data and checkpoint ----------------------------------------------------------------------------
  seq_len = int(config.seq_len)
  # Each process reads and packs every batch but keeps only its rows (`distributed.global_batch`).
  # Preference batches are padding-free here when config.data.pref_packing asks (data/_pref_packing.py).
  train_ds = data_lib.get_dataset(config.data, "train", tokenizer=tokenizer, batch_size=config.batch_size,
                                  seq_len=seq_len, seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count(), packed_preferences=True)
  train_iter = iter(train_ds)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 2),
                               async_save=config.get("async_checkpoints", True))
  # Running loss state fed back each step (BCO's reward mean), checkpointed with the data position.
  carry = {field: 0.0 for _, field in loss_entry.carry}
  restored = ckpt.restore_latest(ckpt_lib.abstract(state, state_sh),
                                 ckpt_lib.abstract(frozen, frozen_sh) if save_frozen else None)
  metrics_offset = None
  if restored is not None:
    _, state, data_state, restored_frozen = restored
    if save_frozen:
      frozen = restored_frozen
    carry = data_state.pop("loss_carry", carry)
    metrics_offset = data_state.pop("metrics_offset", None)
    hook_states = data_state.pop("hooks", {})
    for name, hook in run_hooks:
      if hook.load_state is not None and name in hook_states:
        hook.load_state(hook_states[name])
    train_iter.set_state(data_state)
  start = int(state.step)
  resumed_from = start if restored is not None else None
  if resumed_from is not None:
    print(f"resumed from step {start} (checkpoint {os.path.join(ckpt.directory, str(start))})", flush=True)

  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, start_step=start,
                                    resume_offset=metrics_offset)
  summary_path = os.path.join(workdir, "summary.json")
  summary = (ckpt_lib.read_json(summary_path, {}) or {}) if start else {}
  if history["changes"]:
    summary["config_changes"] = {k: list(v) for k, v in history["changes"].items()}
  if start == 0:
    reports = {"train": getattr(train_ds, "report", None)}
    ec = config.get("eval") or {}
    if ec.get("num_loss_batches", 4):
      split = config.get("eval_split", "test")
      reports[split] = getattr(data_lib.get_dataset(config.data, split, tokenizer=tokenizer,
                                                    batch_size=ec.batch_size, seq_len=seq_len,
                                                    seed=config.seed), "report", None)
    summary["data"] = report_skips(reports, writer, 0)

  def run_eval(step, tag):
    params_now = peft.combine(state.params, frozen)
    # The reference of preference pairs and win rates: the frozen copy, else the base under the adapters.
    reference = ((lambda: ref_params) if ref_params is not None else
                 (lambda: peft.strip(params_now)) if peft.has_adapters(params_now) else None)
    res = eval_lib.evaluate(config, model, params_now, tokenizer,
                            functools.partial(eval_fn, state.params, frozen, ref_params, loss_frozen=loss_frozen),
                            mesh, reference)
    writer.write(step, {f"eval/{k}": v for k, v in res.items()})
    summary[tag] = res
    logging.info("eval@%d %s: %s", step, tag, res)
    return res

  if start == 0 and config.get("eval_before", True):
    res = run_eval(0, "before")
    print(f"[before training] " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)

  # ---- loop -------------------------------------------------------------------------------------------
  progress = metrics_lib.Progress(total_steps, start)
  health = HealthCheck(int(config.get("stuck_loss_window", 200) or 0))
  pending = []                     # (step, data positions before and after, device metrics) not yet checked
  tokens = {"real": 0, "all": 0}   # since the last log line: non-padding and all token slots
  t_last = time.perf_counter()
  log_every = int(config.get("log_every_steps", 10))

  def flush_pending():
    nonlocal t_last
    if not pending:
      return
    fetched = jax.device_get([m for _, _, _, m in pending])
    for (s, before, after, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"loss is {m['loss']} at step {s} (batch at data position {before}; records "
            f"{batch_records(train_ds, before, after)}), the step metrics.jsonl logs as step {s + 1}; "
            f"the last checkpoint (step {ckpt.latest_step()}) is intact")
    s = pending[-1][0]
    m = fetched[-1]
    dt = time.perf_counter() - t_last
    tps = tokens["real"] / max(dt, 1e-9)
    padding = 1.0 - tokens["real"] / max(tokens["all"], 1)
    writer.write(s + 1, {**m, "tokens_per_s": tps, "padding_fraction": padding})
    progress.update(s + 1, float(m["loss"]), tps, padding)
    for (s_i, _, _, _), m_i in zip(pending, fetched):
      health.update(s_i + 1, m_i)
    t_last = time.perf_counter()
    tokens.update(real=0, all=0)
    pending.clear()

  for step in range(start, total_steps):
    for _, hook in run_hooks:      # host work between steps: resampling, ESD refreshes, ...
      if hook.refresh is not None and hook.every and step % hook.every == 0:
        state, frozen, *logged = hook.refresh(step, state, frozen, tx)
        if logged and logged[0]:
          writer.write(step, logged[0])
    pos = train_iter.get_state()
    host_batch = eval_lib.to_model_batch(next(train_iter))
    seg = host_batch.get("segment_ids")
    if seg is not None:
      tokens["real"] += int(np.count_nonzero(seg))
      tokens["all"] += int(np.size(seg))
    host_batch.update({k: np.float32(v) for k, v in carry.items()})
    batch = distributed.global_batch(host_batch, functools.partial(shd.batch_sharding, mesh))
    for _, hook in run_hooks:      # measurements of the batch the step is about to use
      if hook.observe is not None and hook.every and step % hook.every == 0:
        writer.write(step, hook.observe(step, state, frozen, batch))
    state, metrics = step_fn(state, frozen, ref_params, batch, loss_frozen)
    if carry:    # a host sync per step, only for losses that carry state
      carry = {field: float(metrics[metric]) for metric, field in loss_entry.carry}
    pending.append((step, pos, train_iter.get_state(), metrics))
    done = step + 1
    if done % log_every == 0 or done == total_steps:
      flush_pending()
    if config.get("eval_every_steps") and done % config.eval_every_steps == 0 and done != total_steps:
      run_eval(done, f"step_{done}")
    if done % int(config.get("checkpoint_every_steps", 1000)) == 0 or done == total_steps:
      flush_pending()
      writer.flush()     # TensorBoard holds everything up to the checkpoint
      hook_states = {name: hook.state() for name, hook in run_hooks if hook.state is not None}
      ckpt.save(done, state, {**train_iter.get_state(), "loss_carry": carry, "metrics_offset": writer.offset(),
                              "hooks": hook_states},
                force=done == total_steps, frozen=frozen if save_frozen else None)

  flush_pending()
  ckpt.close()
  if total_steps > start or "after" not in summary:
    res = run_eval(total_steps, "after")
    print(f"[after training]  " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
  writer.close()
  plot = (metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path), os.path.join(workdir, "loss_curve.png"))
          if distributed.is_primary() else None)
  summary.update(steps=total_steps, plot=plot, topology=distributed.describe(mesh))
  if health.warnings:
    summary["warnings"] = health.warnings
  if resumed_from is not None:
    summary["resumed_from"] = resumed_from
  if jax.process_index() == 0:
    ckpt_lib.atomic_write(summary_path, json.dumps(summary, indent=2, default=float))
  summary["state"] = state
  summary["frozen"] = frozen
  return summary
