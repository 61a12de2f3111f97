"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts are left-padded to a common length so every row decodes into the same cache slot; the pad slots
carry segment id 0 and are masked out of attention, and RoPE positions count only real tokens.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train_lib import distributed


def sample_logits(logits, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Next token from [B, V] logits. temperature 0 = greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """(tokens, segment_ids, positions) [B, P] int32 with prompts right-aligned."""
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  seg = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, P - len(p):] = p
      seg[i, P - len(p):] = 1
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return tokens, seg, pos


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, params, tokens, seg, pos, rng, stop_ids, *, max_new_tokens, temperature, top_k, top_p):
  B, P = tokens.shape
  cache = model.init_cache(B, P + max_new_tokens)
  logits, cache = model.apply(params, tokens, pos, seg, cache=cache)
  next_pos = pos[:, -1] + 1

  def step(carry, i):
    logits_last, cache, next_pos, done, rng = carry
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits_last, sub, temperature, top_k, top_p).astype(jnp.int32)
    tok = jnp.where(done, 0, tok)
    out_tok = tok
    done_next = done | jnp.isin(tok, stop_ids)
    logits_new, cache = model.apply(params, tok[:, None], next_pos[:, None], jnp.ones((B, 1), jnp.int32),
                                    cache=cache)
    return (logits_new[:, -1], cache, next_pos + 1, done_next, rng), (out_tok, done)

  init = (logits[:, -1], cache, next_pos, jnp.zeros((B,), bool), rng)
  _, (toks, was_done) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return toks.T, (~was_done).T      # [B, N] tokens and validity (stop token included, after it invalid)


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, rng=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             pad_id: int = 0) -> list[list[int]]:
  """Generates continuations of token-id prompts; each output stops before its first stop token."""
  tokens, seg, pos = left_pad(prompts, pad_id)
  rng = rng if rng is not None else jax.random.PRNGKey(0)
  put = functools.partial(distributed.like_params, params=params)   # on every process's devices when several
  toks, valid = _generate(model, params, put(tokens), put(seg), put(pos), put(rng),
                          put(np.asarray(list(stop_ids) or [-1], np.int32)), max_new_tokens=max_new_tokens,
                          temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  toks, valid = distributed.to_host(toks), distributed.to_host(valid)
  stop_set = set(int(s) for s in stop_ids)
  out = []
  for row, ok in zip(toks, valid):
    seq = []
    for t, v in zip(row, ok):
      if not v or int(t) in stop_set:
        break
      seq.append(int(t))
    out.append(seq)
  return out
