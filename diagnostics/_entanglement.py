"""Gradient entanglement of pairwise preference losses.

*A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement* (Yuan et al., arXiv
2410.13828). Margin losses pin only logπ(y_w) - logπ(y_l), so the two log-probs can move together. With
g_w = ∇logπ(y_w), g_l = ∇logπ(y_l) (over the trainable parameters) and the loss gradient
-(d_w g_w - d_l g_l), d_w, d_l >= 0 (DPO: d_w = d_l = β σ(-βδ)), one step of size η gives, to first order,

    Δ logπ(y_w) ≈ η (d_w ‖g_w‖² - d_l ⟨g_w, g_l⟩)   chosen falls   iff ⟨g_w, g_l⟩ > (d_w/d_l) ‖g_w‖²
    Δ logπ(y_l) ≈ η (d_w ⟨g_w, g_l⟩ - d_l ‖g_l‖²)   rejected rises iff ⟨g_w, g_l⟩ > (d_l/d_w) ‖g_l‖²

`entanglement` measures ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖², their cosine and the two indicator fractions on the
first `n_pairs` pairs of a [B, 2, T] batch (index 0 chosen, 1 rejected). Pairs run one after the other
under `lax.map`, so memory holds one pair's two gradients at a time, not n_pairs of them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import hooks
import losses
import peft

MODEL_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def tree_dot(a, b) -> jax.Array:
  """Σ over leaves of <a, b> in float32 (None leaves are empty subtrees)."""
  return sum((jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)).real
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros((), jnp.float32))


def indicators(dot, norm_sq_chosen, norm_sq_rejected, d_ratio=1.0):
  """(chosen falls, rejected rises) as floats in {0, 1}; d_ratio = d_w / d_l (1 for DPO)."""
  falls = (dot > d_ratio * norm_sq_chosen).astype(jnp.float32)
  rises = (dot > norm_sq_rejected / d_ratio).astype(jnp.float32)
  return falls, rises


def pair_stats(g_w, g_l, d_ratio=1.0) -> dict:
  """The per-pair statistics of two gradient pytrees."""
  dot, nw, nl = tree_dot(g_w, g_l), tree_dot(g_w, g_w), tree_dot(g_l, g_l)
  falls, rises = indicators(dot, nw, nl, d_ratio)
  # tiny floor: a zero gradient (e.g. an all-masked row) gives cosine 0, not NaN
  cos = dot / jnp.sqrt(jnp.maximum(nw * nl, 1e-30))
  return {"dot": dot, "norm_sq_chosen": nw, "norm_sq_rejected": nl, "cosine": cos,
          "chosen_falls": falls, "rejected_rises": rises}


def entanglement(model, trainable, frozen, batch, n_pairs: int = 4, d_ratio: float = 1.0,
                 per_pair: bool = False) -> dict:
  """Gradient-entanglement statistics, means over the first `n_pairs` pairs of `batch`.

  Args:
    model: the `models.Decoder`.
    trainable, frozen: the split parameters (`peft.split`); gradients are taken w.r.t. `trainable`.
    batch: a model batch with [B, 2, T] arrays (chosen at index 0, rejected at 1).
    n_pairs: how many pairs (clipped to B).
    d_ratio: d_w / d_l of the loss' gradient weights (1 for DPO and the other symmetric margin losses).
    per_pair: also return the [n_pairs] per-pair arrays under "per_pair".

  Returns:
    {"entanglement/dot", "entanglement/norm_sq_chosen", "entanglement/norm_sq_rejected",
     "entanglement/cosine", "entanglement/chosen_falls", "entanglement/rejected_rises"}: float32 scalars
    (the last two are fractions of pairs).
  """
  n = min(int(n_pairs), batch["inputs"].shape[0])
  pairs = {k: batch[k][:n] for k in MODEL_KEYS if batch.get(k) is not None}

  def one(pair):
    ex = jax.tree.map(lambda x: x[None], pair)             # [1, 2, T]

    def logps(t):
      return losses.model_outputs(model, peft.combine(t, frozen), ex)["logps"][0]   # [2]

    g = jax.jacrev(logps)(trainable)                       # leaves [2, ...]
    g_w, g_l = jax.tree.map(lambda x: x[0], g), jax.tree.map(lambda x: x[1], g)
    return pair_stats(g_w, g_l, d_ratio)

  stats = jax.lax.map(one, pairs)
  out = {f"entanglement/{k}": v.mean() for k, v in stats.items()}
  if per_pair:
    out["per_pair"] = stats
  return out


def _enabled(config) -> bool:
  return bool(config.get("entanglement_every_steps")) and config.data.get("pref_kind") == "pairwise"


@hooks.register_hook("entanglement", enabled=_enabled)
def _entanglement_hook(config, model) -> hooks.HostHook:
  """Every `config.entanglement_every_steps` steps of a pairwise run, before the step: the entanglement of
  the gradients that step is about to use, logged as `entanglement/*`."""
  fn = jax.jit(functools.partial(entanglement, model, n_pairs=4))
  return hooks.HostHook(every=int(config.entanglement_every_steps),
                        observe=lambda step, state, frozen, batch: jax.device_get(fn(state.params, frozen, batch)))
