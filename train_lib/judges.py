"""Preference metrics on held-out pairs, and the win rate of the policy against the reference model judged
by a configurable judge.

    preference_metrics(config, model, policy, reference, tokenizer, "pairs.jsonl")
    judge = make_judge("verifier" | "module:function" | "rm:DIR", check=verifier)
    win_rate(judge, prompts, policy_texts, reference_texts)   # win_rate, win_rate/{wins,ties,losses}

Preference metrics (TRL's names, with the run's `loss.beta`, 0.1 if it has none): rewards/chosen and
rewards/rejected (beta * (log pi - log pi_ref) of the response, means), rewards/margins (their mean
difference), rewards/accuracies (share of pairs whose chosen reward is higher), ranking_accuracy (share of
pairs whose policy log-probability of chosen is higher, as in training), logps/chosen and logps/rejected.

The win rate is (wins + ties / 2) / prompts, a win being a higher judge score for the policy's greedy
response than for the reference's. Judges score (prompt, response) -> float:
  verifier          1.0 if the task's verifier accepts the response, else 0.0 (built-in tasks; a prompt
                    file's records with an `answer` are checked by exact match of the stripped text)
  module:function   a user function `function(prompt: str, response: str) -> float`, imported from `module`
  rm:DIR (or DIR)   a reward model: a project workdir or a Hugging Face checkpoint directory (with its
                    tokenizer). The sequence is `data.encode_prompt(prompt) + encode(response) + [eos]`.
                    With a scalar head (`reward_head.npz` in DIR: `weight` [hidden], optional `bias` []),
                    the score is weight . h + bias, h the model's final normed hidden state at the last
                    token. A Hugging Face `*ForSequenceClassification` checkpoint (num_labels=1, e.g. a
                    reward model trained with TRL's RewardTrainer) scores with its own `score` head, read
                    where transformers reads it: the last token that is not the config's
                    `pad_token_id`. Without a head, the score is the mean log-probability per token of
                    `response + eos` given the prompt under that model (a language model as judge).
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import data as data_lib
import losses
import models
from train_lib import build
from train_lib import loglik

Judge = Callable[[Sequence[str], Sequence[str]], np.ndarray]
HEAD_FILE = "reward_head.npz"
_MODEL_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


# ---- preference metrics --------------------------------------------------------------------------------
def pairs_config(data_config, path: str) -> ml_collections.ConfigDict:
  """The run's data options, reading pairwise records from the file `path` (its 'train' split: all of it)."""
  cfg = ml_collections.ConfigDict(data_config.to_dict())
  cfg.source, cfg.path, cfg.pref_kind, cfg.train_size = "jsonl", path.replace("{", "{{").replace("}", "}}"), \
      "pairwise", None
  return cfg


def _pair_logps(model, params, batch):
  return losses.model_outputs(model, params, batch)["logps"]


_pair_logps_jit = jax.jit(_pair_logps, static_argnums=0)


def _rows(batch: dict, start: int, size: int) -> tuple[dict, int]:
  """Rows start..start+size of a batch, padded to `size` with copies of its first row."""
  part = {k: v[start:start + size] for k, v in batch.items() if k in _MODEL_KEYS}
  n = len(part["inputs"])
  if n < size:
    part = {k: np.concatenate([v, np.repeat(v[:1], size - n, 0)]) for k, v in part.items()}
  return part, n


def preference_logps(model, params, batch: dict, batch_size: int) -> np.ndarray:
  out = []
  for s in range(0, len(batch["inputs"]), batch_size):
    part, n = _rows(batch, s, batch_size)
    out.append(np.asarray(jax.device_get(_pair_logps_jit(model, params, {k: jnp.asarray(v) for k, v in part.items()})))[:n])
  return np.concatenate(out)


def preference_metrics(config, model, policy, reference, tokenizer, path: str, n: int | None = None) -> dict:
  cfg = pairs_config(config.data, path)
  records = data_lib.preference_eval_examples(cfg, "train", n)
  batch = data_lib.preference_batch(records, cfg, tokenizer=tokenizer, seq_len=int(config.seq_len))
  bs = int(config.eval.batch_size)
  pi = preference_logps(model, policy, batch, bs)
  ref = preference_logps(model, reference, batch, bs)
  beta = float(config.loss.get("beta", 0.1) or 0.1)
  rc, rr = beta * (pi[:, 0] - ref[:, 0]), beta * (pi[:, 1] - ref[:, 1])
  return {"rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
          "rewards/margins": float((rc - rr).mean()), "rewards/accuracies": float((rc > rr).mean()),
          "ranking_accuracy": float((pi[:, 0] > pi[:, 1]).mean()),
          "logps/chosen": float(pi[:, 0].mean()), "logps/rejected": float(pi[:, 1].mean())}


# ---- judges --------------------------------------------------------------------------------------------
def win_rate(judge: Judge, prompts: Sequence[str], policy_texts: Sequence[str],
             reference_texts: Sequence[str]) -> dict:
  p = np.asarray(judge(prompts, policy_texts), np.float64)
  r = np.asarray(judge(prompts, reference_texts), np.float64)
  wins, ties = int(np.sum(p > r)), int(np.sum(p == r))
  n = max(len(prompts), 1)
  return {"win_rate": (wins + 0.5 * ties) / n, "win_rate/wins": wins, "win_rate/ties": ties,
          "win_rate/losses": len(prompts) - wins - ties}


def make_judge(spec: str, check: Callable[[str, str], bool] | None = None, *, batch_size: int = 16,
               max_len: int = 2048) -> Judge:
  spec = (spec or "verifier").strip()
  if spec == "verifier":
    if check is None:
      raise ValueError("judge 'verifier' needs a task verifier (a built-in task, or prompt records with 'answer')")
    return lambda prompts, texts: np.array([float(bool(check(p, t))) for p, t in zip(prompts, texts)])
  if spec.startswith("rm:") or os.path.isdir(spec):
    return RewardModel(spec[3:] if spec.startswith("rm:") else spec, batch_size=batch_size, max_len=max_len)
  module, sep, name = spec.partition(":")
  if not sep:
    raise ValueError(f"judge {spec!r}: expected 'verifier', 'module:function' or 'rm:DIR'")
  fn = getattr(importlib.import_module(module), name)
  return lambda prompts, texts: np.array([float(fn(p, t)) for p, t in zip(prompts, texts)])


def _hidden_at(model, params, tokens, seg, last):
  _, hidden = model.apply(params, tokens, None, seg, return_hidden=True)
  return jnp.take_along_axis(hidden.astype(jnp.float32), last[:, None, None], axis=1)[:, 0]


def _score_at(model, params, tokens, seg, last):
  scores = model.apply(params, tokens, None, seg)     # [B, T, 1]: the score head is the output layer
  return jnp.take_along_axis(scores.astype(jnp.float32), last[:, None, None], axis=1)[:, 0, 0]


_hidden_at_jit = jax.jit(_hidden_at, static_argnums=0)
_score_at_jit = jax.jit(_score_at, static_argnums=0)


class RewardModel:
  """A judge from a project workdir or an HF checkpoint directory (see the module docstring)."""

  def __init__(self, path: str, batch_size: int = 16, max_len: int = 2048):
    self.classifier, self.pad_id = False, None
    if os.path.exists(os.path.join(path, build.CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints")):
      _, self.model, self.params, self.tokenizer = build.load_trained(path)
    else:
      with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
      self.classifier = models.is_classifier(hf)
      cfg, params = models.load_hf(path, head="score" if self.classifier else "lm")
      if self.classifier:
        labels = params["lm_head"]["kernel"].shape[1]
        if labels != 1:
          raise ValueError(f"reward model {path}: its score head has {labels} labels; a judge reads one "
                           "score per sequence (num_labels=1)")
        self.pad_id = hf.get("pad_token_id")
      self.model, self.params = models.Decoder(cfg), jax.tree.map(jnp.asarray, params)
      self.tokenizer = data_lib.load_tokenizer(path)
    head = os.path.join(path, HEAD_FILE)
    self.head = None
    if os.path.exists(head):
      if self.classifier:
        raise ValueError(f"{path} holds both a sequence-classification `score` head and {HEAD_FILE}; "
                         "remove one")
      with np.load(head) as f:
        self.head = (np.asarray(f["weight"], np.float32).reshape(-1),
                     float(f["bias"]) if "bias" in f.files else 0.0)
    self.batch_size, self.max_len = batch_size, max_len

  def _pair(self, prompt: str, response: str):
    tok = self.tokenizer
    cont = list(tok.encode(response)) + ([tok.eos_id] if tok.eos_id is not None else [])
    return data_lib.encode_prompt(tok, prompt), cont

  def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    pairs = [self._pair(p, t) for p, t in zip(prompts, texts)]
    if self.head is None and not self.classifier:
      lls, _ = loglik.loglikelihoods(self.model, self.params, pairs, batch_size=self.batch_size,
                                     max_len=self.max_len, pad_id=self.tokenizer.pad_id)
      return lls / np.array([len(c) for _, c in pairs], np.float32)
    out = []
    for s in range(0, len(pairs), self.batch_size):
      seqs = [(c + r)[-self.max_len:] for c, r in pairs[s:s + self.batch_size]]
      T = max(len(x) for x in seqs)
      tokens = np.zeros((self.batch_size, T), np.int32)
      seg = np.zeros((self.batch_size, T), np.int32)
      last = np.zeros((self.batch_size,), np.int32)
      for i, x in enumerate(seqs):
        tokens[i, :len(x)], seg[i, :len(x)] = x, 1
        last[i] = models.score_position(x, self.pad_id) if self.classifier else len(x) - 1
      args = (self.model, self.params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(last))
      if self.classifier:
        out.append(np.asarray(_score_at_jit(*args))[:len(seqs)])
      else:
        weight, bias = self.head
        out.append(np.asarray(_hidden_at_jit(*args))[:len(seqs)] @ weight + bias)
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
