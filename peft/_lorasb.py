"""LoRA-SB: the LoRA-XS form with only an r x r matrix trained, initialised so that the adapter starts at the
best rank-r approximation of the first full fine-tuning update.

    y = x W0 + s ((drop(x) A) R) B,     A [in, r], B [r, out] frozen,   R [r, r] trained,   s = alpha / r

Data-driven init (`config.peft.init=lorasb`, a `peft.register_data_init`), in our [in, out] layout:

    G       = sum over calibration batches of dL/dW                      [in, out]
    ΔW_1    = -eta sign(G)      ("adam": Adam's first step, the reference)   or   -eta G / n  ("sgd", on the mean)
    ΔW_1    = U S V^T   (top r);     A = U_r,   B = V_r^T,   R = S_r / s    (so s A R B = the rank-r ΔW_1)

The base is left as it is: the model at init is W0 + (rank-r ΔW_1), one simulated full fine-tuning step (the
reference does not subtract it either). eta is the learning rate of that first step: the reference takes
lr / (warmup_ratio * total_steps), the first rate of its linear warmup (`train_*.py: eff_lr`), so here
eta = `lorasb_lr / lorasb_warmup_steps` (defaults: its arithmetic lr 1e-4 and one step, no warmup); set both
to match the run's optimizer. The reference sums per-batch mean gradients and takes their sign (a sum or a
mean gives the same sign); its SVD is `torch.svd_lowrank(q=r, niter=10)`, ours exact (the products agree;
the factors up to sign).

Without the data init (`config.peft.init=default`) the adapter is plain LoRA-XS: A = U_r S_r, B = V_r^T from
the SVD of W0, R ~ N(0, sigma^2) with sigma = `options.xs_sigma` (the reference's 1e-5; 0 makes the output at
init exactly the base's).

(Ponkshe et al., 2024, "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning", arXiv:2411.19557; `RaghavSinghal10/lora-sb`: `utils/gradient_utils.py`,
`utils/initialization_utils.py: find_and_initialize_grad`, `utils/latent_utils.py`. Bałazy et al., 2024,
"LoRA-XS", arXiv:2405.17604.) The reference sets alpha = r (s = 1); any s works here since R absorbs 1/s.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from peft._core import Adapter, dot, is_adapter, map_with_path
from peft._data_init import Calibration, register_data_init
from peft._loraga import node_gradients
from peft._lora import LowRankShape
from peft._node import AdapterSpec, adapter_node, input_dropout, options_with_defaults, register_adapter, static_field
from peft._quant import float_weight

LORASB_OPTIONS = dict(xs_sigma=1e-5)


@adapter_node
class LoRASB(LowRankShape, Adapter):
  base: Any                         # [..., in, out] kernel or QuantizedWeight (left unchanged)
  a: jax.Array                      # [..., in, r]  frozen (PEFT-style lora_A^T)
  r: jax.Array                      # [..., r, r]   trained (the reference's latent mapping, transposed)
  b: jax.Array                      # [..., r, out] frozen (lora_B^T)
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (peft.with_dropout_rng)
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)

  trainable_fields = ("r",)

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, self.a.astype(x.dtype))
    low = jnp.einsum("...r,rs->...s", low, self.r.astype(x.dtype))
    return dot(x, self.base) + jnp.einsum("...s,so->...o", low, self.b.astype(x.dtype)) * self.scale

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """s A R B [..., in, out]."""
    ar = jnp.einsum("...ir,...rs->...is", self.a.astype(dtype), self.r.astype(dtype))
    return self.scale * jnp.einsum("...is,...so->...io", ar, self.b.astype(dtype))

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(jnp.dtype(self.base.dtype))


@register_adapter("lorasb")
def make_lorasb(base, spec: AdapterSpec, rng, path: str) -> LoRASB:
  """LoRA-XS factors from the SVD of W0 (replaced by `init=lorasb` from calibration gradients)."""
  del path
  opts = options_with_defaults("lorasb", LORASB_OPTIONS, spec.options)
  w = float_weight(base, jnp.float32)
  if spec.rank > min(w.shape[-2:]):
    raise ValueError(f"lorasb needs r <= min(in, out) = {min(w.shape[-2:])}, got {spec.rank}")
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  a = u[..., :spec.rank] * s[..., None, :spec.rank]
  b = vt[..., :spec.rank, :]
  r = float(opts["xs_sigma"]) * jax.random.normal(rng, w.shape[:-2] + (spec.rank, spec.rank), jnp.float32)
  return LoRASB(base, a.astype(spec.dtype), r.astype(spec.dtype), b.astype(spec.dtype), scale=spec.scale,
                dropout=spec.dropout)


def first_update(g: jax.Array, lr: float, optimizer: str = "adam") -> jax.Array:
  """ΔW_1 from the mean gradient g: Adam's first step -lr sign(g), or SGD's -lr g."""
  if optimizer == "adam":
    return -lr * jnp.sign(g)
  if optimizer == "sgd":
    return -lr * g
  raise ValueError(f"lorasb: lorasb_optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def lorasb_factors(update: jax.Array, rank: int, scale: float):
  """(A = U_r [in, r], R = S_r / s [r, r], B = V_r^T [r, out]) of the top-r SVD of one update [in, out]."""
  u, s, vt = jnp.linalg.svd(update.astype(jnp.float32), full_matrices=False)
  return u[:, :rank], jnp.diag(s[:rank] / scale), vt[:rank]


def lorasb_init(params, loss_fn, batches, *, lr: float = 1e-4, optimizer: str = "adam"):
  """LoRA-SB nodes of `params` -> A, R, B from the simulated first update; `loss_fn(plain params, batch)`."""
  nodes, grads = node_gradients(params, lambda l: isinstance(l, LoRASB), loss_fn, list(batches),
                                "init=lorasb needs LoRA-SB adapters (config.peft.method=lorasb)")

  def put(path, node):
    if path not in nodes:
      return node
    # mean_gradient averages where the reference sums: the same sign; SGD's step is on the mean.
    upd = first_update(grads[path].astype(jnp.float32), lr, optimizer)
    lead = upd.shape[:-2]
    fn = lambda u: lorasb_factors(u, node.rank, node.scale)
    a, r, b = jax.vmap(fn)(upd.reshape((-1,) + upd.shape[-2:]))
    un = lambda x: x.reshape(lead + x.shape[1:])
    return node.replace(a=un(a).astype(node.a.dtype), r=un(r).astype(node.r.dtype), b=un(b).astype(node.b.dtype))

  return map_with_path(put, params, is_leaf=is_adapter)


@register_data_init("lorasb", defaults=dict(lorasb_lr=1e-4, lorasb_warmup_steps=1, lorasb_optimizer="adam"),
                    mutates_base=True)   # A and B are frozen: the trainer checkpoints the frozen tree
def lorasb_from_calibration(params, calib: Calibration, opts: dict):
  """The `data_init` entry: eta = lorasb_lr / lorasb_warmup_steps, the first step's learning rate."""
  lr = float(opts["lorasb_lr"]) / float(opts["lorasb_warmup_steps"])
  return lorasb_init(params, calib.loss_fn, calib.batches, lr=lr, optimizer=str(opts["lorasb_optimizer"]))
