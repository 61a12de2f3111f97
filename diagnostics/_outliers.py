r"""Layerwise outlier distribution (LOD): the per-block share of outlier Wanda scores, OWL's and OwLore's score.

Yin et al., *Outlier Weighed Layerwise Sparsity (OWL)*, ICML 2024 (`luuyin/OWL: lib/prune_all.py`
`check_outlier_mean`, `lib/layerwrapper.py` `WrappedGPT.add_batch`); Li et al., *OwLore: Outlier-weighed
Layerwise Sampled Low-Rank Projection*, arXiv 2405.18380, which samples decoder blocks in proportion to it.

**Calibration.** For every linear sublayer and input channel j, the mean over calibration samples (rows)
of the squared L2 norm of that channel's input over the sample's real tokens:

.. math::  s_j = \frac{1}{N} \sum_{n=1}^{N} \| X^{(n)}_{:, j} \|_2^2

(`WrappedGPT.add_batch` keeps this as a running mean over batches of samples.) The decoder's
`capture_inputs=True` returns the sums per block; q/k/v share their input, as do gate/up. OWL's pass is
sequential (block l's outputs feed block l+1) on the unpruned model, which is the same as one forward pass.

**Score and LOD.** On our `[in, out]` kernels (the transpose of torch's `[out, in]`), j indexes the `in`
axis: :math:`A_{ij} = |W_{ij}| \sqrt{s_i}`, Wanda's score. For decoder block l, with the scores of all its
linear sublayers (q, k, v, o, gate, up, down) concatenated,

.. math::  D_l = 100 \cdot \#\{A > M \cdot \mathrm{mean}(A)\} / \mathrm{numel}(A)   \quad (\text{a percentage}).

**M.** OWL's argparse default (`--Hyper_m`) is 3, its LLaMA README uses 5, and OwLore's cached vector is
named `..._ratio_13.txt`: OwLore's repository holds no code that computes it, so 13 is read from that file
name only (its 32 values, 0.018 to 0.295 percent, are consistent with a high threshold). This module's
default stays M = 5, the value OWL documents for LLaMA models (its LOD analysis); OwLore's sampling uses 13
(`optim/_sampling.py`, `sampling.outlier_M`). D_l is scale-invariant (multiplying W or every s_j by a
constant changes nothing), so only M sets its level.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import peft

DEFAULT_M = 5.0

# Which captured statistic is the input of which kernel under `layers/`.
SUBLAYER_INPUTS = {
    ("attn", "q_proj"): "attn_in", ("attn", "k_proj"): "attn_in", ("attn", "v_proj"): "attn_in",
    ("attn", "o_proj"): "o_proj_in",
    ("mlp", "gate_proj"): "mlp_in", ("mlp", "up_proj"): "mlp_in", ("mlp", "down_proj"): "down_proj_in",
}


def _rows(batch) -> dict:
  """{inputs, positions, segment_ids} as [N, T] arrays from a trainer batch ([B, T] or [B, K, T])."""
  if not isinstance(batch, Mapping):
    batch = {"inputs": batch}
  tokens = np.asarray(batch["inputs"])
  T = tokens.shape[-1]
  get = lambda k: None if batch.get(k) is None else jnp.asarray(np.asarray(batch[k]).reshape(-1, T))
  return {"inputs": jnp.asarray(tokens.reshape(-1, T)), "positions": get("positions"),
          "segment_ids": get("segment_ids")}


@functools.partial(jax.jit, static_argnums=0)
def _captured(model, params, tokens, positions, segment_ids):
  return model.apply(params, tokens, positions, segment_ids, capture_inputs=True)[-1]


def channel_norms(model, params, batches: Iterable) -> dict[str, np.ndarray]:
  """{attn_in, o_proj_in, mlp_in, down_proj_in: [L, in]} float64: s_j, the mean over the calibration rows
  of the squared norm of each input channel over real tokens (segment id != 0)."""
  sums, n = None, 0
  for batch in batches:
    rows = _rows(batch)
    stats = jax.device_get(_captured(model, params, rows["inputs"], rows["positions"], rows["segment_ids"]))
    stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    sums = stats if sums is None else {k: sums[k] + stats[k] for k in sums}
    n += rows["inputs"].shape[0]
  if sums is None:
    raise ValueError("channel_norms: no calibration batches")
  return {k: v / n for k, v in sums.items()}


def wanda_scores(kernel, s) -> jax.Array:
  """A = |W| * sqrt(s) for an [in, out] kernel and its input statistics s [in] (broadcast over `out`)."""
  return jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(jnp.asarray(s, jnp.float32))[:, None]


@jax.jit
def _block_ratio(kernels, stats, M):
  scores = [wanda_scores(w, s) for w, s in zip(kernels, stats)]
  total = sum(a.sum() for a in scores)
  numel = sum(a.size for a in scores)
  threshold = M * total / numel
  count = sum(jnp.sum(a > threshold) for a in scores)
  return 100.0 * count / numel


def _kernels(params) -> dict:
  layers = peft.merge(params)["layers"]
  return {key: layers[key[0]][key[1]]["kernel"] for key in SUBLAYER_INPUTS}


def outlier_distribution(params, norms: Mapping[str, Any], M: float = DEFAULT_M) -> np.ndarray:
  """D_l [L] (percent) from the stacked kernels of `params` (adapters merged) and `channel_norms` output."""
  if not M > 0:
    raise ValueError(f"outlier threshold M must be > 0, got {M}")
  kernels = _kernels(params)
  L = next(iter(kernels.values())).shape[0]
  out = np.empty(L)
  for l in range(L):   # one block at a time: the scores of a 7B block fit where the whole model would not
    ws = [kernels[k][l] for k in SUBLAYER_INPUTS]
    ss = [np.asarray(norms[SUBLAYER_INPUTS[k]])[l] for k in SUBLAYER_INPUTS]
    out[l] = float(_block_ratio(ws, ss, jnp.float32(M)))
  return out


def outlier_ratios(model, params, batches: Iterable, M: float = DEFAULT_M) -> np.ndarray:
  """The LOD D_l [L] of `params` calibrated on `batches` (see the module docstring)."""
  return outlier_distribution(params, channel_norms(model, params, batches), M)
