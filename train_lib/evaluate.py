"""Evaluation: held-out loss, exact match of greedy generations checked by the task's verifier, and the
task files of `config.eval.tasks` (multiple choice, generation with answer extraction, perplexity,
preference pairs, win rates: `train_lib.eval_tasks`, `train_lib.judges`).

    res = evaluate(config, model, params, tokenizer, eval_fn, mesh, reference=lambda: ref_params)

`reference` (a function giving the reference model's parameters, or None) is needed only by preference
pairs and win rates; without one those are skipped (logged).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

import data as data_lib
from train_lib import eval_tasks
from train_lib import generation as gen_lib
from train_lib import judges
from train_lib import sharding as shd

MODEL_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def to_model_batch(batch: dict) -> dict:
  """Host batch -> [B, K, T] layout (SFT batches get K = 1)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = v[:, None] if k in MODEL_KEYS and v.ndim == 2 else v
  return out


def put_batch(batch: dict, mesh) -> dict:
  return {k: jax.device_put(v, shd.batch_sharding(mesh, np.ndim(v)) if np.ndim(v) else shd.replicated(mesh))
          for k, v in batch.items()}


def heldout_loss(config, tokenizer, eval_fn, mesh) -> dict:
  ec = config.eval
  it = data_lib.get_dataset(config.data, config.get("eval_split", "test"), tokenizer=tokenizer,
                            batch_size=ec.batch_size, seq_len=int(config.seq_len), seed=config.seed)
  sums, n = {}, 0
  for i, batch in enumerate(it):
    if i >= ec.get("num_loss_batches", 4):
      break
    m = jax.device_get(eval_fn(put_batch(to_model_batch(batch), mesh)))
    # The last eval batch is filled with masked copies: weight each batch by its real examples.
    w = float(np.sum(batch["example_mask"])) if "example_mask" in batch else 1.0
    for k, v in m.items():
      if np.ndim(v) == 0:
        sums[k] = sums.get(k, 0.0) + w * float(v)
    n += w
  return {k: v / max(n, 1e-9) for k, v in sums.items()}


def exact_match(config, model, params, tokenizer) -> float:
  ec = config.eval
  examples, check = data_lib.eval_examples(config.data, config.get("eval_split", "test"), ec.num_examples)
  if not examples:
    return float("nan")
  correct = 0
  bs = ec.batch_size
  stops = data_lib.stop_ids(tokenizer)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  for i in range(0, len(examples), bs):
    chunk = examples[i:i + bs]
    prompts = [data_lib.encode_prompt(tokenizer, p) for p, _ in chunk]
    outs = gen_lib.generate(model, params, prompts, max_new_tokens=ec.max_new_tokens, stop_ids=stops, pad_id=pad)
    for (p, _), o in zip(chunk, outs):
      correct += bool(check(p, tokenizer.decode(o)))
  return correct / len(examples)


def _prompt_text(tokenizer, record: dict, where: str, chat: bool = False) -> str:
  if isinstance(record.get("prompt"), str):
    return eval_tasks.chat_wrap(tokenizer, record["prompt"]) if chat else record["prompt"]
  if isinstance(record.get("messages"), list):
    return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
  raise ValueError(f"{where}: a win-rate record needs 'prompt' (text) or 'messages'")


def win_rate(config, model, params, ref_params, tokenizer, prompts, judge) -> dict:
  ec = config.eval
  policy = eval_tasks.generate_texts(model, params, tokenizer, prompts, ec)
  reference = eval_tasks.generate_texts(model, ref_params, tokenizer, prompts, ec)
  return judges.win_rate(judge, prompts, policy, reference)


def run_tasks(config, model, params, tokenizer, mesh=None, reference=None) -> dict:
  """The metrics of every task file in `config.eval.tasks` (NAME/metric), and the built-in task's win rate
  (`config.eval.win_rate`)."""
  ec = config.eval
  res, ref_params = {}, None
  limit = ec.get("num_task_examples", 0) or None

  def ref():
    nonlocal ref_params
    if ref_params is None and reference is not None:
      ref_params = reference()
    return ref_params

  judge_spec = ec.get("judge", "verifier")
  for kind, name, path in eval_tasks.parse_tasks(ec.get("tasks", "")):
    records = eval_tasks.read_jsonl(path, limit)
    if kind == "mc":
      m, _ = eval_tasks.run_mc(model, params, tokenizer, records, ec, mesh, where=path)
    elif kind == "gen":
      m, _ = eval_tasks.run_gen(model, params, tokenizer, records, ec, where=path)
    elif kind == "ppl":
      m = eval_tasks.run_ppl(model, params, tokenizer, records, ec, mesh, where=path)
    elif ref() is None:
      logging.warning("eval task %s (%s) needs a reference model; none in this run, skipped", name, kind)
      continue
    elif kind == "pref":
      m = judges.preference_metrics(config, model, params, ref(), tokenizer, path, limit)
    else:   # winrate
      prompts = [_prompt_text(tokenizer, r, f"{path}:{i + 1}", ec.get("apply_chat_template", False))
                 for i, r in enumerate(records)]
      golds = {p: str(r["answer"]) for p, r in zip(prompts, records) if "answer" in r}
      check = (lambda p, t: p in golds and t.strip() == golds[p].strip()) if golds else None
      m = win_rate(config, model, params, ref(), tokenizer, prompts,
                   judges.make_judge(judge_spec, check, batch_size=ec.batch_size))
    res.update({f"{name}/{k}": v for k, v in m.items()})
  if ec.get("win_rate", False):
    if ref() is None:
      logging.warning("eval.win_rate needs a reference model; none in this run, skipped")
    else:
      examples, check = data_lib.eval_examples(config.data, config.get("eval_split", "test"),
                                               ec.get("num_examples", 0) or None)
      m = win_rate(config, model, params, ref(), tokenizer, [p for p, _ in examples],
                   judges.make_judge(judge_spec, check, batch_size=ec.batch_size))
      res.update(m)
  return res


def evaluate(config, model, params, tokenizer, eval_fn, mesh, reference=None) -> dict:
  res = {}
  if config.eval.get("num_loss_batches", 4):
    res.update(heldout_loss(config, tokenizer, eval_fn, mesh))
  if config.eval.get("num_examples", 0):
    res["exact_match"] = exact_match(config, model, params, tokenizer)
  res.update(run_tasks(config, model, params, tokenizer, mesh, reference))
  return res
