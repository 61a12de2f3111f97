"""CorDA: LoRA's factors from the SVD of the weight times the covariance of its inputs, in two modes.

In torch's layout (W [out, in]; ours is W^T), with X_k the inputs [T, in] of calibration sequence k:

    C = (1/K) sum_k (X_k / c_k)^T (X_k / c_k),      c_k = |max_(t,i) X_k[t, i]|   (PEFT: per forward of one)
    C~ = C + lambda mean(diag C) I,   lambda = 0.01, doubled until ||C~ C~^-1 - I||_F < 0.05
    W C~ = U S V^T,    V' = (V^T C~^-1)^T            so that  W = U S V'^T
    IPA (instruction-previewed): the r largest components;  KPA (knowledge-preserved): the r smallest
    lora_A = sqrt(S_r / s) V'_r^T,   lora_B = U_r sqrt(S_r / s),   W_res = W - s lora_B lora_A

(Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", arXiv:2406.05223.) As PEFT 0.21 (`tuners/lora/corda.py`,
`preprocess_corda`; `LoraLayer.corda_init`): the uncentred second moment, each sample divided by the absolute
value of its largest (signed) entry, averaged over samples; the damping schedule; S split evenly between the
factors after dividing by s. A sample here is one sequence (a row of the calibration batch, its real tokens),
as PEFT's hook sees a batch of one (its `squeeze(0)` then `t()` needs it). In our [in, out] layout A = lora_A^T,
B = lora_B^T; W_res + s A B = W, so the output at init is the base model's.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from peft._core import is_adapter, map_with_path
from peft._data_init import Calibration, register_data_init
from peft._eva import input_stats
from peft._quant import float_weight, like_base

MODES = {"ipa": "ipa", "ipm": "ipa", "kpa": "kpa", "kpm": "kpa"}   # the paper's names and PEFT's
DAMP, INV_TOL = 0.01, 0.05


def lora_nodes(params, who: str) -> dict:
  """{path: node} of the LoRA-like nodes (with factors a, b) of params; raises when there is none."""
  nodes = {}
  map_with_path(lambda p, l: nodes.setdefault(p, l) if is_adapter(l) and hasattr(l, "a") else None, params,
                is_leaf=is_adapter)
  if not nodes:
    raise ValueError(f"{who} needs LoRA adapters (config.peft.method=lora)")
  return nodes


def sample_weights(x, mask):
  """Token weights [B, T] that make sum_t w x x^T = (X_k / c_k)^T (X_k / c_k) per sequence: mask / c_k^2, with c_k
  the absolute value of the largest entry of the sequence's real tokens (PEFT's `input / torch.max(input).abs()`)."""
  if x.shape[:-1] != mask.shape:
    raise ValueError(f"CorDA reads a layer's inputs as [B, T, in] beside the [B, T] mask, got {x.shape} and "
                     f"{mask.shape}")
  top = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=(-2, -1))
  c2 = jnp.where(jnp.isfinite(top) & (top != 0), top * top, 1.0)
  return mask / c2[..., None]


def damped(cov):
  """(C~, C~^-1): C plus lambda mean(diag C) I, lambda doubled from 0.01 until the inverse is accurate (PEFT)."""
  eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
  fix = lambda d: cov + eye * jnp.mean(jnp.diag(cov)) * d
  err = lambda d: jnp.linalg.norm(fix(d) @ jnp.linalg.inv(fix(d)) - eye)
  d = jax.lax.while_loop(lambda d: err(d) >= INV_TOL, lambda d: 2 * d, jnp.asarray(DAMP, cov.dtype))
  return fix(d), jnp.linalg.inv(fix(d))


def corda_factors(w, cov, rank: int, scale: float, mode: str = "ipa"):
  """(A [in, r], B [r, out], W_res) of one matrix w [in, out] from its input covariance cov [in, in]."""
  cfix, cinv = damped(cov)
  u, s, vh = jnp.linalg.svd(w.T @ cfix, full_matrices=False)     # PEFT's W [out, in] times C~
  v = (vh @ cinv).T                                               # [in, k]
  sel = slice(0, rank) if MODES[mode] == "ipa" else slice(s.shape[0] - rank, s.shape[0])
  sr = s[sel] / scale
  a = v[:, sel] * jnp.sqrt(sr)
  b = (u[:, sel] * jnp.sqrt(sr)).T
  return a, b, w - scale * a @ b


def covariances(forward: Callable, params, batches: list[dict], paths: list[str]) -> dict:
  """{path: C [..., in, in]}: the normalised second moment of each path's inputs, averaged over the
  sequences (rows with a token in `eva_mask`) of all batches."""
  if not batches:
    raise ValueError("CorDA needs calibration batches (config.peft.data_init.batches > 0)")
  for acc in input_stats(forward, params, batches, paths, weigh=sample_weights):
    pass
  samples = sum(float(jnp.sum(jnp.any(b["eva_mask"], -1))) for b in batches)
  return {p: acc[p][1] / samples for p in paths}


def corda_init(params, forward: Callable, batches: Iterable[dict], *, mode: str = "ipa"):
  """LoRA nodes of `params` -> CorDA factors and residual bases. `forward(params, batch)` runs the model on a
  batch that carries `eva_mask` [B, T] (the real tokens)."""
  if mode not in MODES:
    raise ValueError(f"corda_mode={mode!r}; valid: {', '.join(MODES)}")
  nodes = lora_nodes(params, "CorDA")
  base = map_with_path(lambda p, l: l.base if p in nodes else l, params, is_leaf=is_adapter)
  cov = covariances(forward, base, list(batches), list(nodes))

  def put(path, node):
    if path not in nodes:
      return node
    if min(node.base.shape[-2:]) < node.rank:
      raise ValueError(f"{path}: CorDA needs r <= min(in, out), got r = {node.rank}")
    w = float_weight(node.base, jnp.float32)
    lead = w.shape[:-2]
    fn = jax.jit(jax.vmap(lambda ww, cc: corda_factors(ww, cc, node.rank, node.scale, mode)))
    c = cov[path].astype(jnp.float32)
    a, b, res = fn(w.reshape((-1,) + w.shape[-2:]), c.reshape((-1,) + c.shape[-2:]))
    if not bool(jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))):   # PEFT raises on the same
      raise ValueError(f"{path}: CorDA's factors are not finite (calibration inputs all zero or not finite?)")
    un = lambda x: x.reshape(lead + x.shape[1:])
    return node.replace(a=un(a).astype(node.a.dtype), b=un(b).astype(node.b.dtype),
                        base=like_base(node.base, un(res)))

  return map_with_path(put, params, is_leaf=is_adapter)


@register_data_init("corda", defaults=dict(corda_mode="ipa"), mutates_base=True)
def corda_from_calibration(params, calib: Calibration, opts: dict):
  """The `data_init` entry: covariances over the real tokens (segment id != 0) of the calibration rows."""
  batches = [dict(b, eva_mask=b["flat_segment_ids"] != 0) for b in calib.batches]
  return corda_init(params, calib.forward, batches, mode=str(opts["corda_mode"]))
