"""The forward pass that makes the losses' inputs: `Outputs` of a [B, K, T] batch (see `losses._registry`).

    policy = losses.model_outputs(model, params, batch, needs=entry.needs_for(config.loss))

`model` is anything with `apply(params, tokens, positions, segment_ids, return_hidden=True)` (a
`models.Decoder`; `input_embeddings(params)` too for the "token_embeddings" need, `prefix_ids=` for
shared-prompt batches of `data._pref_packing`); this module imports no
model code, so losses, diagnostics and the trainer all use it.
Unless a loss needs the full `logits`, `losses._chunked.head_outputs` computes the log-probs, logZ and
log sum p^2 in tiles (the model's `logits_chunk`), never holding the [B, T, V] float32 logits.

**Positions.** A preference or SFT row (`data._sft.assemble`) holds `bos + prompt + response + eos` as
inputs with the targets shifted by one, so the loss mask sits on the input positions whose *target* is a
response token or the eos:

    inputs     bos  p1 .. pn   r1 .. rm   eos
    targets    p1   p2 .. r1   r2 .. eos  pad
    loss_mask  0    0  ..  1   1  ..  1    0

The input positions 0..n (bos, p1..pn) are the prompt's: under causal attention their hidden states have
seen prompt tokens only, and position n (the last prompt token, the first loss position) has seen all of
them. Every later position has seen a response token. `prompt_positions` marks exactly 0..n of each
segment: the positions with no loss position before them in their segment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._chunked import head_outputs


def _masked_mean(x, mask, axis):
  return (x * mask[..., None]).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)[..., None]


def prompt_positions(mask, segment_ids=None):
  """1.0 on the prompt's input positions [N, T] (bos + prompt tokens), 0.0 elsewhere (see the module
  docstring): real positions (segment != 0) with no loss position earlier in their own segment."""
  mask = mask.astype(jnp.float32)
  seg = jnp.ones(mask.shape, jnp.int32) if segment_ids is None else segment_ids
  before = jnp.cumsum(mask, axis=-1) - mask                    # loss positions strictly before, in the row
  start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=-1)
  # `before` is non-decreasing, so a running max of its values at segment starts is the value at the
  # start of the current segment: the loss positions of earlier segments.
  at_start = jax.lax.cummax(jnp.where(start, before, 0.0), axis=1)
  return ((before - at_start == 0.0) & (seg != 0)).astype(jnp.float32)


def last_positions(mask, segment_ids=None):
  """(last prompt position [N], last real position of the completion's segment [N]) of each row.

  The first is the last prompt token (it has seen the whole prompt); the second is the eos input (or the
  last input of a response cut by truncation): it has seen prompt and response, the sequence's summary
  under causal attention."""
  T = mask.shape[-1]
  idx = jnp.arange(T)
  first_loss = jnp.argmax(mask > 0, axis=-1)
  last_loss = T - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)
  if segment_ids is None:
    return first_loss, jnp.full_like(first_loss, T - 1)
  seg_of = jnp.take_along_axis(segment_ids, last_loss[:, None], axis=-1)
  last_real = jnp.max(jnp.where(segment_ids == seg_of, idx, -1), axis=-1)
  return first_loss, jnp.maximum(last_real, 0)


def packed_view(batch):
  """(index [N, T] into the flattened rows, valid [N, T]) of a padding-free preference batch
  (`data._pref_packing`): `seq_index` [B, K, T] counts slots within its group of `inputs` [G, R, L]."""
  G, R, L = batch["inputs"].shape
  index = batch["seq_index"]
  B, T = index.shape[0], index.shape[-1]
  valid = index >= 0
  group = jnp.arange(B, dtype=index.dtype) // (B // G)     # examples of group g are rows g*B/G ...
  flat = jnp.where(valid, index + (group * (R * L))[:, None, None], 0)
  return flat.reshape(-1, T), valid.reshape(-1, T)


def model_outputs(model, params, batch, needs=frozenset()) -> dict:
  """The `losses.Outputs` dict for a [B, K, T] batch: one forward pass over all B*K sequences.

  A padding-free batch (with `seq_index`, `data._pref_packing`) runs the model over its packed rows and
  gathers each per-token quantity back into the [B*K, T] view of the padded batch (zero where a
  sequence has no token), so every output below, and every loss, is the padded batch's."""
  T = batch["inputs"].shape[-1]
  flat = lambda k: batch[k].reshape(-1, T) if batch.get(k) is not None else None
  # Without segment ids (unpacked, unpadded rows) the model takes the plain causal path (cuDNN flash).
  # logits: [N, T, V] float32, or None when the head was applied in tiles (then `stats` holds the rest).
  logits, hidden, stats = head_outputs(model, params, flat("inputs"), flat("positions"), flat("segment_ids"),
                                       flat("targets"), needs, prefix_ids=flat("prefix_ids"))
  mask = flat("loss_mask").astype(jnp.float32)
  if "seq_index" in batch:
    lead = batch["seq_index"].shape[:-1]
    index, valid = packed_view(batch)

    def view(x):   # [rows, T, ...] -> [B*K, T, ...]; the gather's gradient scatters back to the rows
      if x is None:
        return None
      got = x.reshape((-1,) + x.shape[2:])[index]
      return jnp.where(valid.reshape(valid.shape + (1,) * (got.ndim - 2)), got, jnp.zeros((), got.dtype))
    logits, hidden, mask = view(logits), view(hidden), view(mask)
    stats = {k: view(v) for k, v in stats.items()}
    seg = valid.astype(jnp.int32)   # one segment per sequence, as in its padded row
    T = index.shape[-1]
  else:
    lead = batch["inputs"].shape[:-1]
    seg = flat("segment_ids")
  logz, token_logps = stats["logz"], stats["logp"]
  out = {"token_logps": token_logps, "mask": mask, "logps": (token_logps * mask).sum(-1),
         "lengths": mask.sum(-1)}
  if "logz" in needs:
    out["logz"] = logz
  if "embeddings" in needs:
    h = hidden.astype(jnp.float32)
    out["embeddings"] = _masked_mean(h, mask, 1)
    out["prompt_embeddings"] = _masked_mean(h, prompt_positions(mask, seg), 1)
  if "last_hidden" in needs:
    h = hidden.astype(jnp.float32)
    prompt_last, seq_last = last_positions(mask, seg)
    out["prompt_last_embeddings"] = jnp.take_along_axis(h, prompt_last[:, None, None], axis=1)[:, 0]
    out["last_embeddings"] = jnp.take_along_axis(h, seq_last[:, None, None], axis=1)[:, 0]
  if "last_logits" in needs:
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    if logits is None:    # the head at these positions only
      h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
      out["last_logits"] = model.logits(params, h_last)[:, 0].astype(jnp.float32)
    else:
      out["last_logits"] = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  if "logits" in needs:
    out["logits"] = logits
  if "log_sum_sq_probs" in needs:
    out["log_sum_sq_probs"] = stats["log_sum_sq"]
  out = jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)
  if "token_embeddings" in needs:
    # The input embedding table [V, D] itself (not per sequence, no copy), detached: a ground cost.
    out["token_embeddings"] = jax.lax.stop_gradient(model.input_embeddings(params))
  return out
