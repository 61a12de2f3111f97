"""The forward pass that makes the losses' inputs: `Outputs` of a [B, K, T] batch (see `losses._registry`).

    policy = losses.model_outputs(model, params, batch, needs=entry.needs_for(config.loss))

`model` is anything with `apply(params, tokens, positions, segment_ids, return_hidden=True)` (a
`models.Decoder`); this module imports no model code, so losses, diagnostics and the trainer all use it.
Unless a loss needs the full `logits`, `losses._chunked.head_outputs` computes the log-probs, logZ and
log sum p^2 in tiles (the model's `logits_chunk`), never holding the [B, T, V] float32 logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._chunked import head_outputs


def _masked_mean(x, mask, axis):
  return (x * mask[..., None]).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)[..., None]


def model_outputs(model, params, batch, needs=frozenset()) -> dict:
  """The `losses.Outputs` dict for a [B, K, T] batch: one forward pass over all B*K sequences."""
  lead, T = batch["inputs"].shape[:-1], batch["inputs"].shape[-1]
  flat = lambda k: batch[k].reshape(-1, T) if batch.get(k) is not None else None
  # Without segment ids (unpacked, unpadded rows) the model takes the plain causal path (cuDNN flash).
  # logits: [N, T, V] float32, or None when the head was applied in tiles (then `stats` holds the rest).
  logits, hidden, stats = head_outputs(model, params, flat("inputs"), flat("positions"), flat("segment_ids"),
                                       flat("targets"), needs)
  logz, token_logps = stats["logz"], stats["logp"]
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
    if logits is None:    # the head at these positions only
      h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
      out["last_logits"] = model.logits(params, h_last)[:, 0].astype(jnp.float32)
    else:
      out["last_logits"] = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  if "logits" in needs:
    out["logits"] = logits
  if "log_sum_sq_probs" in needs:
    out["log_sum_sq_probs"] = stats["log_sum_sq"]
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)
