"""Log-likelihoods of continuations through the jitted model, batched and sharding-aware, with the token
conventions of lm-evaluation-harness's `HFLM`:

    pairs = [encode_pair(tok, context, continuation), ...]      # (context ids, continuation ids)
    lls, greedy = loglikelihoods(model, params, pairs, batch_size=16, max_len=2048, mesh=mesh)

`encode_pair` moves trailing whitespace of the context to the continuation, encodes context + continuation
and the context alone (bos as the checkpoint's tokenizer adds it: `data.encode_prompt`) and takes the
continuation as the tokens after the context's; an empty context becomes the prefix token (bos, else eos).
A sequence longer than `max_len + 1` loses tokens on the left. Each result is the summed log-probability of
the continuation tokens and whether each of them is the argmax (lm-eval's `is_greedy`).

`rolling_windows` splits a document into lm-eval's `loglikelihood_rolling` windows (perplexity).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import data as data_lib
import losses
from train_lib import sharding as shd


def prefix_token(tokenizer) -> int:
  return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  if not context:
    cont = list(tokenizer.encode(continuation))
    return [prefix_token(tokenizer)], cont
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = data_lib.encode_prompt(tokenizer, context + continuation)
  ctx = data_lib.encode_prompt(tokenizer, context)
  return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
  """lm-eval's rolling windows (context_len 1), made disjoint: (context, continuation) pairs whose
  continuations tile `tokens`; the first is conditioned on `prefix` only, later ones on up to max_len
  tokens before them."""
  tokens = list(tokens)
  if not tokens:
    return []
  first = min(max_len, len(tokens))
  out, done = [([prefix], tokens[:first])], first
  while done < len(tokens):
    n = min(len(tokens) - done, max_len)
    end = done + n
    inputs = tokens[end - max_len - 1:end - 1]        # the model's inputs; their last n predict the new tokens
    out.append((inputs[:len(inputs) - (n - 1)], tokens[done:end]))
    done = end
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model, params, batch):
  out = losses.model_outputs(model, params, batch, frozenset({"logits"}))
  mask = out["mask"] > 0
  greedy = jnp.all((jnp.argmax(out["logits"], -1) == batch["targets"]) | ~mask, axis=-1)
  return out["logps"][:, 0], greedy[:, 0]


def _bucket(n: int) -> int:
  b = 16
  while b < n:
    b *= 2
  return b


def _put(batch: dict, mesh) -> dict:
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return {k: jax.device_put(v, shd.batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}


def loglikelihoods(model, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
                   max_len: int, mesh=None, pad_id: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
  """Summed continuation log-probabilities [N] (float32) and is_greedy [N] (bool) of (context,
  continuation) token pairs; the rows of a batch are padded on the right to a power-of-two length."""
  pad = 0 if pad_id is None else int(pad_id)
  seqs = []
  for ctx, cont in pairs:
    if not cont:
      raise ValueError("an empty continuation has no log-likelihood")
    whole = (list(ctx) + list(cont))[-(max_len + 1):]
    seqs.append((whole, min(len(cont), len(whole) - 1)))
  lls, greedy = np.zeros(len(seqs), np.float32), np.zeros(len(seqs), bool)
  order = np.argsort([-len(s) for s, _ in seqs], kind="stable")   # similar lengths share a batch
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    T = _bucket(max(len(seqs[i][0]) - 1 for i in idx))
    B = batch_size
    inputs = np.full((B, 1, T), pad, np.int32)
    targets = np.full((B, 1, T), pad, np.int32)
    mask = np.zeros((B, 1, T), np.float32)
    seg = np.zeros((B, 1, T), np.int32)
    for r, i in enumerate(idx):
      whole, n = seqs[i]
      L = len(whole) - 1
      inputs[r, 0, :L], targets[r, 0, :L] = whole[:-1], whole[1:]
      mask[r, 0, L - n:L] = 1.0
      seg[r, 0, :L] = 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, 1, T)).copy()
    batch = _put(dict(inputs=inputs, targets=targets, loss_mask=mask, segment_ids=seg, positions=pos), mesh)
    ll, gr = jax.device_get(_score(model, params, batch))
    lls[idx], greedy[idx] = ll[:len(idx)], gr[:len(idx)]
  return lls, greedy
