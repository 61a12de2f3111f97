"""LoRA-GA: LoRA's factors from the SVD of the full weight's gradient, the base shifted so the output at
init is the base model's.

    G = mean over calibration batches of dL/dW   [in, out]  (our layout; PEFT's grad is G^T)
    G = U S V^T;   A = U[:, :r],   B = zeta S[r:2r] V[:, r:2r]^T     ("ArB2r": A the first r directions,
                                                                        B the next r, so s A B != 0)
    zeta = out^(1/4) / sqrt(gamma)      (the "stable" scale; PEFT's default gamma = 16)
    W_res = W - s A B                   (y = x W_res + s x A B = x W at init)

(Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv:2407.05000.) As PEFT
0.21 (`lora/layer.py`, `loraga_init`) the singular values go to B only and the stable factor scales B. PEFT
takes the SVD with `torch.svd_lowrank(q=4r, niter=4)` (randomised); we take the exact SVD, which that one
approximates (singular vectors are defined up to sign: compare the products).
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from peft._core import is_adapter, map_with_path
from peft._data_init import Calibration, register_data_init
from peft._quant import float_weight, like_base


def lora_ga_factors(g, w, rank: int, scale: float, gamma: float = 16.0):
  """(A [in, r], B [r, out], W_res) from the gradient g [in, out] of one matrix w; float32."""
  u, s, vt = jnp.linalg.svd(g, full_matrices=False)
  a = u[:, :rank]
  zeta = w.shape[-1] ** 0.25 / gamma ** 0.5
  b = zeta * s[rank:2 * rank, None] * vt[rank:2 * rank]
  return a, b, w - scale * a @ b


def mean_gradient(loss_fn: Callable, params, batches: Iterable[dict]):
  """The mean over `batches` of d loss_fn(params, batch) / d params."""
  grad = jax.jit(jax.grad(loss_fn))
  total, k = None, 0
  for batch in batches:
    g = grad(params, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    k += 1
  return jax.tree.map(lambda x: x / k, total)


def node_gradients(params, select: Callable, loss_fn: Callable, batches: Iterable[dict], missing: str):
  """({path: node} of the adapter nodes `select` picks, {path: mean gradient of `loss_fn` with respect to
  that node's full weight}), the gradients taken on the plain model (those nodes replaced by their float32
  bases); `missing`: the error when `select` picks none."""
  nodes = {}
  map_with_path(lambda p, l: nodes.setdefault(p, l) if is_adapter(l) and select(l) else None, params,
                is_leaf=is_adapter)
  if not nodes:
    raise ValueError(missing)
  base = map_with_path(lambda p, l: float_weight(l.base, jnp.float32) if p in nodes else l, params,
                       is_leaf=is_adapter)
  grads = {}
  map_with_path(lambda p, l: grads.setdefault(p, l), mean_gradient(loss_fn, base, batches))
  return nodes, grads


def lora_ga_init(params, loss_fn: Callable, batches: Iterable[dict], *, gamma: float = 16.0):
  """LoRA nodes of `params` -> LoRA-GA factors and residual bases; `loss_fn(plain params, batch)`."""
  nodes, grads = node_gradients(params, lambda l: hasattr(l, "a"), loss_fn, batches,
                                "LoRA-GA needs LoRA adapters (config.peft.method=lora)")

  def put(path, node):
    if path not in nodes:
      return node
    if min(node.base.shape[-2:]) < 2 * node.rank:
      raise ValueError(f"{path}: LoRA-GA needs 2 r <= min(in, out), got r = {node.rank}")
    w = float_weight(node.base, jnp.float32)
    g = grads[path].astype(jnp.float32)
    lead = w.shape[:-2]
    fn = lambda gg, ww: lora_ga_factors(gg, ww, node.rank, node.scale, gamma)
    a, b, res = jax.vmap(fn)(g.reshape((-1,) + g.shape[-2:]), w.reshape((-1,) + w.shape[-2:]))
    un = lambda x: x.reshape(lead + x.shape[1:])
    return node.replace(a=un(a).astype(node.a.dtype), b=un(b).astype(node.b.dtype),
                        base=like_base(node.base, un(res)))

  return map_with_path(put, params, is_leaf=is_adapter)


@register_data_init("lora_ga", defaults=dict(lora_ga_gamma=16.0), mutates_base=True)
def lora_ga_from_calibration(params, calib: Calibration, opts: dict):
  """The `data_init` entry: the gradient of the run's loss, averaged over the calibration batches."""
  return lora_ga_init(params, calib.loss_fn, calib.batches, gamma=float(opts["lora_ga_gamma"]))
