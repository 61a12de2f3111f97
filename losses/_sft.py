"""SFT: token negative log-likelihood over completion tokens, with an optional z-loss."""
from __future__ import annotations

import jax.numpy as jnp

from losses._registry import register


def masked_mean(x, mask):
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@register("nll", needs=("logz",), kind="sft")
def nll_loss(policy, reference, batch, cfg):
  """mean over completion tokens of -log p(y_t), + z_loss * mean(logZ^2) (PaLM's z-loss)."""
  del reference, batch
  mask = policy["mask"]
  nll = masked_mean(-policy["token_logps"], mask)
  z = masked_mean(jnp.square(policy["logz"]), mask)
  loss = nll + cfg.get("z_loss", 0.0) * z
  return loss, {"nll": nll, "z_loss": z, "tokens": mask.sum()}
