"""The forward pass that makes the losses' inputs: `Outputs` of a [B, K, T] batch (see `losses._registry`).

    policy = losses.model_outputs(model, params, batch, needs=entry.needs_for(config.loss))

`model` is anything with `apply(params, tokens, positions, segment_ids, return_hidden=True)` (a
`models.Decoder`); this module imports no model code, so losses, diagnostics and the trainer all use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(x, mask, axis):
  return (x * mask[..., None]).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)[..., None]


def model_outputs(model, params, batch, needs=frozenset()) -> dict:
  """The `losses.Outputs` dict for a [B, K, T] batch: one forward pass over all B*K sequences."""
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
