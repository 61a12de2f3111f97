"""EVA: LoRA's A from the principal directions of each layer's inputs on a few calibration batches.

    X [n, in]  the layer's inputs over real (and, as PEFT's default, label) tokens;  C = cov(X) (centred)
    C = V diag(lambda) V^T  (lambda descending);   A = V[:, :r_l],  B = 0
    ratio_l,i = lambda_l,i / sum_j lambda_l,j      (explained-variance ratio of component i of layer l)
    r_l = #{ i < round(rho r) : ratio_l,i is among the top  sum_l r  ratios of all layers }

(Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv:2410.07170.) The eigenvectors of C are the right singular vectors of the centred X, so
A^T rows are what PEFT's incremental PCA (`lora/eva.py`) converges to; we accumulate sum x, sum x x^T and n
over the batches and solve exactly, stopping early once every layer's kept components moved less than tau
(|cos| with the previous batch's >= tau), as PEFT's convergence check does.

Stacked layers hold one rank per path: a layer given fewer than the path's largest r_l gets zero columns in
A. With B = 0 a zero column of A and its row of B get zero gradient forever (xA = 0 and dL/dA = x^T g B^T = 0),
so the layer trains at rank r_l exactly, as PEFT's per-module ranks; r_l = 0 is PEFT's removed adapter.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import losses
from peft._core import Adapter, dot, is_adapter, map_with_path
from peft._data_init import Calibration, register_data_init
from peft._node import adapter_node, static_field

_MASK: list = []   # the token mask [B, T] of the batch being captured (a trace-time value)
_SOW = "eva_stats/"
_PARTS = ("s1:", "s2:", "n:")


@adapter_node
class InputStats(Adapter):
  """Stands in for a kernel while calibrating: y = x W, and sows (sum m x, sum m x x^T, sum m) of its input."""
  base: Any
  path: str = static_field(default="")

  def dot(self, x):
    m = _MASK[-1].astype(jnp.float32).reshape(-1, 1)
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    for part, v in zip(_PARTS, ((m * xf).sum(0), (m * xf).T @ xf, m.sum())):
      losses.sow(_SOW + part + self.path, v)
    return dot(x, self.base)

  def materialize(self):
    return self.base


@contextlib.contextmanager
def token_mask(mask):
  _MASK.append(mask)
  try:
    yield
  finally:
    _MASK.pop()


def input_stats(forward: Callable, params, batches: Iterable[dict], paths: list[str]):
  """Yields, after each batch, {path: (sum x [..., in], sum x x^T [..., in, in], n [...])} accumulated so far.
  `forward(params, batch)` runs the model; its batch carries `eva_mask` [B, T] (the tokens to count)."""
  wrapped = map_with_path(lambda p, l: InputStats(l, path=p) if p in paths else l, params)

  @jax.jit
  def stats(params, batch):
    with losses.collecting() as sown, token_mask(batch["eva_mask"]):
      forward(params, batch)
    out = {}
    for p in paths:
      s1, s2, n = (sown[_SOW + part + p][0] for part in _PARTS)
      if s2.ndim == 4:       # stacked: [L, 1, ...] from the model's scan
        s1, s2, n = s1[:, 0], s2[:, 0], n[:, 0]
      out[p] = (s1, s2, n)
    return out

  acc = None
  for batch in batches:
    new = stats(wrapped, batch)
    acc = new if acc is None else jax.tree.map(jnp.add, acc, new)
    yield acc


def principal_components(s1, s2, n):
  """(eigenvalues descending, eigenvectors as columns) of the centred covariance of the inputs; [..., in]."""
  mean = s1 / n[..., None]
  cov = (s2 - n[..., None, None] * mean[..., :, None] * mean[..., None, :]) / (n[..., None, None] - 1)
  lam, vec = jnp.linalg.eigh(cov)
  return lam[..., ::-1], vec[..., ::-1]


def redistribute_ranks(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
  """{name: r_l}: the `budget` largest explained-variance ratios over all layers, counted per layer. Each
  `ratios[name]` holds that layer's first round(rho r) ratios."""
  names = [k for k, v in ratios.items() for _ in v]
  values = np.concatenate([np.asarray(v) for v in ratios.values()])
  top = np.argsort(-values, kind="stable")[:budget]
  counts = {k: 0 for k in ratios}
  for i in top:
    counts[names[i]] += 1
  return counts


def eva_init(params, forward: Callable, batches: Iterable[dict], *, rho: float = 2.0, tau: float = 0.99,
             whiten: bool = False) -> dict:
  """LoRA nodes of `params` (B = 0) -> A from EVA. Returns (params, {layer name: rank})."""
  nodes = {}
  map_with_path(lambda p, l: nodes.setdefault(p, l) if is_adapter(l) and hasattr(l, "a") else None, params,
                is_leaf=is_adapter)
  if not nodes:
    raise ValueError("EVA needs LoRA adapters (config.peft.method=lora)")
  base = map_with_path(lambda p, l: l.base if p in nodes else l, params, is_leaf=is_adapter)
  r = {p: n.rank for p, n in nodes.items()}
  keep = {p: max(int(round(r[p] * rho)), 1) for p in nodes}
  prev, comps = None, None
  for acc in input_stats(forward, base, batches, list(nodes)):
    comps = {p: principal_components(*acc[p]) for p in nodes}
    cur = {p: v[..., :keep[p]] for p, (_, v) in comps.items()}
    if prev is not None and all(
        bool(jnp.all(jnp.abs(jnp.sum(cur[p] * prev[p], -2)) >= tau)) for p in nodes):
      break
    prev = cur
  ratios = {}
  for p, (lam, _) in comps.items():
    lam = np.asarray(lam, np.float64)
    lam2 = lam.reshape(-1, lam.shape[-1])
    for i, row in enumerate(lam2):
      ratios[(p, i)] = (row / row.sum())[:keep[p]]
  ranks = redistribute_ranks(ratios, sum(r[p] * max(int(np.prod(nodes[p].lead_shape)), 1) for p in nodes))

  def put(path, node):
    if path not in nodes:
      return node
    lam, vec = comps[path]
    lead = node.lead_shape
    rl = np.array([ranks[(path, i)] for i in range(max(int(np.prod(lead)), 1))]).reshape(lead)
    width = max(int(rl.max()), 1)
    v = vec[..., :width]
    if whiten:
      v = v / jnp.sqrt(lam[..., None, :width])
    cols = jnp.arange(width) < jnp.asarray(rl)[..., None]
    a = jnp.where(cols[..., None, :], v, 0.0).astype(node.a.dtype)
    b = jnp.zeros(lead + (width, node.b.shape[-1]), node.b.dtype)
    return node.replace(a=a, b=b)

  return map_with_path(put, params, is_leaf=is_adapter), ranks


@register_data_init("eva", defaults=dict(eva_rho=2.0, eva_tau=0.99, eva_whiten=False))
def eva_from_calibration(params, calib: Calibration, opts: dict):
  """The `data_init` entry: EVA on the calibration batches, counting `token_mask` tokens (PEFT's label mask)."""
  batches = [dict(b, eva_mask=b["token_mask"]) for b in calib.batches]
  params, ranks = eva_init(params, calib.forward, batches, rho=float(opts["eva_rho"]),
                           tau=float(opts["eva_tau"]), whiten=bool(opts["eva_whiten"]))
  logging.info("EVA ranks: %s", {f"{p}[{i}]": r for (p, i), r in ranks.items()})
  return params
