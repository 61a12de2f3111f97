r"""Embedding kernels of DPO-Kernels, as log K(x, y) over the last axis, and the Hierarchical Mixture.

Paper: Das et al. 2025, "DPO Kernels: A Semantically-Aware, Kernel-Enhanced, and Divergence-Rich Paradigm
for Direct Preference Optimization" (arXiv 2501.03271). Reference code: anonymous-panda123/DPO-Kernels.

    polynomial    K = (x.y + c)^d                  log K = d log max(x.y + c, 1e-12)      c = 1, d = 2
    rbf           K = exp(-|x - y|^2 / (2 sigma^2))                                       sigma = 1 (>= 1e-6)
    spectral      K = sum_k lambda_k exp(-a_k |x - y|^2)                                  lambda = a = (1,)
    mahalanobis   K = exp(-(x - y)^T S (x - y) / 2),   S = Sigma^-1                        S = I (+ eps I)

Mahalanobis: S = Sigma^-1 comes in one of three ways. Given (`precision=`, e.g. estimated from the data's
embeddings by `mahalanobis_precision_from_embeddings` or loaded from a file), it is used as is. Learned
(`chol=`): the reference code learns S itself and can lose positive-definiteness; here S = L L^T + eps I
is built from a lower-triangular factor L (only `tril(L)` is read), so it is positive (semi)definite by
construction and definite for eps > 0. Neither: S = (1 + eps) I, which is RBF with sigma = 1. Spectral: lambda_k are clamped > 0 and a_k >= 0 (the reference clamps a only), and
the sum is taken as a logsumexp, so a large distance does not underflow to the 1e-12 clamp.

**HMK** (the paper's Hierarchical Mixture of Kernels):
    K = tau_L (w_rbf K_rbf + w_poly K_poly) + tau_G (w_spec K_spec + w_maha K_maha)
  (tau_L, tau_G), (w_rbf, w_poly), (w_spec, w_maha) are softmaxes of three pairs of logits that start at 0
  (every weight 0.5). The learnable parameters form a small dict from `init_hmk_params(dim)`: the logits,
  sigma, c, lambdas = (1.0, 0.5), alphas = (1.0, 0.1) and the Mahalanobis factor L = I (dim x dim); the
  polynomial degree is a static int. log K is computed as a logsumexp over the four weighted components,
  equal to the reference formula wherever that does not hit its 1e-12 clamp.
  `hmk_entropy` is the summed entropy of the three softmaxes, for a regulariser against kernel collapse
  that the paper mentions; its exact form and coefficient are not in the reference code and are
  unverified against the paper.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("polynomial", "rbf", "spectral", "mahalanobis")
_EPS = 1e-12


def _sq_dist(x, y):
  return jnp.sum(jnp.square(x - y), axis=-1)


def log_polynomial(x, y, c=1.0, degree=2):
  return degree * jnp.log(jnp.maximum(jnp.sum(x * y, axis=-1) + c, _EPS))


def log_rbf(x, y, sigma=1.0):
  return -_sq_dist(x, y) / (2.0 * jnp.square(jnp.maximum(sigma, 1e-6)))


def log_spectral(x, y, lambdas=(1.0,), alphas=(1.0,)):
  lambdas = jnp.maximum(jnp.asarray(lambdas, x.dtype), _EPS)
  alphas = jnp.maximum(jnp.asarray(alphas, x.dtype), 0.0)
  d2 = _sq_dist(x, y)[..., None]
  return jax.nn.logsumexp(jnp.log(lambdas) - alphas * d2, axis=-1)


def mahalanobis_precision(chol, eps=1e-6):
  """S = L L^T + eps I from the lower triangle of `chol` [D, D]."""
  lower = jnp.tril(chol)
  return lower @ lower.T + eps * jnp.eye(chol.shape[-1], dtype=chol.dtype)


def log_mahalanobis(x, y, chol=None, eps=1e-6, *, precision=None):
  """-(x - y)^T S (x - y) / 2 with S = `precision` (Sigma^-1 [D, D], as given) if given, else
  S = L L^T + eps I, computed as -(|L^T d|^2 + eps |d|^2) / 2 (L = `chol`, the identity when None)."""
  d = x - y
  if precision is not None:
    return -0.5 * jnp.sum((d @ jnp.asarray(precision, d.dtype)) * d, axis=-1)
  if chol is None:
    return -0.5 * (1.0 + eps) * jnp.sum(d * d, axis=-1)
  proj = d @ jnp.tril(chol).astype(d.dtype)
  return -0.5 * (jnp.sum(proj * proj, axis=-1) + eps * jnp.sum(d * d, axis=-1))


def mahalanobis_precision_from_embeddings(embeddings, shrinkage: float = 0.1) -> np.ndarray:
  """Sigma^-1 [D, D] (float64, numpy) estimated from embeddings [N, D] of the data.

  Sigma = (1 - s) C + s (tr C / D) I: the sample covariance C shrunk towards the scaled identity (the
  target of Ledoit and Wolf, 2004, with a fixed weight s = `shrinkage` in [0, 1]), so that the inverse
  exists when N <= D and stays well conditioned. Save it with `np.save` and name the file in the config
  (`loss.maha_sigma_inv`)."""
  e = np.asarray(embeddings, np.float64)
  if e.ndim != 2 or e.shape[0] < 2:
    raise ValueError(f"embeddings must be [N >= 2, D], got shape {e.shape}")
  if not 0.0 <= shrinkage <= 1.0:
    raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
  c = np.cov(e, rowvar=False).reshape(e.shape[1], e.shape[1])
  target = np.trace(c) / c.shape[0] * np.eye(c.shape[0])
  sigma = (1.0 - shrinkage) * c + shrinkage * target
  inv = np.linalg.inv(sigma)
  return 0.5 * (inv + inv.T)


def log_kernel(kind: str, x, y, **params):
  fns = {"polynomial": log_polynomial, "rbf": log_rbf, "spectral": log_spectral,
         "mahalanobis": log_mahalanobis}
  if kind not in fns:
    raise ValueError(f"unknown kernel {kind!r}; valid: {KERNELS + ('hmk',)}")
  return fns[kind](x, y, **params)


# ---------------------------------------------------------------------------------------------------
# Hierarchical Mixture of Kernels.
# ---------------------------------------------------------------------------------------------------
def init_hmk_params(dim: int, rng: Any = None, dtype=jnp.float32) -> dict[str, jax.Array]:
  """The reference initialisation; deterministic, so `rng` is accepted for the usual init signature only."""
  del rng
  return {
      "top_logits": jnp.zeros((2,), dtype),     # (local, global)
      "local_logits": jnp.zeros((2,), dtype),   # (rbf, polynomial)
      "global_logits": jnp.zeros((2,), dtype),  # (spectral, mahalanobis)
      "sigma": jnp.asarray(1.0, dtype),
      "c": jnp.asarray(1.0, dtype),
      "lambdas": jnp.asarray([1.0, 0.5], dtype),
      "alphas": jnp.asarray([1.0, 0.1], dtype),
      "maha_chol": jnp.eye(dim, dtype=dtype),
  }


def hmk_weights(params) -> dict[str, jax.Array]:
  """The six mixture weights, named as in the paper."""
  tau = jax.nn.softmax(params["top_logits"])
  w_loc = jax.nn.softmax(params["local_logits"])
  w_glo = jax.nn.softmax(params["global_logits"])
  return {"tau_local": tau[0], "tau_global": tau[1], "w_rbf": w_loc[0], "w_poly": w_loc[1],
          "w_spec": w_glo[0], "w_maha": w_glo[1]}


def log_hmk(x, y, params, degree=2, maha_eps=1e-6):
  """log of the HMK mixture kernel."""
  lt = jax.nn.log_softmax(params["top_logits"])
  ll = jax.nn.log_softmax(params["local_logits"])
  lg = jax.nn.log_softmax(params["global_logits"])
  parts = jnp.stack([
      lt[0] + ll[0] + log_rbf(x, y, params["sigma"]),
      lt[0] + ll[1] + log_polynomial(x, y, params["c"], degree),
      lt[1] + lg[0] + log_spectral(x, y, params["lambdas"], params["alphas"]),
      lt[1] + lg[1] + log_mahalanobis(x, y, params["maha_chol"], maha_eps),
  ], axis=-1)
  return jax.nn.logsumexp(parts, axis=-1)


def hmk_entropy(params):
  """Sum of the entropies of the three two-way softmaxes; maximal (3 log 2) at the initialisation."""
  total = 0.0
  for name in ("top_logits", "local_logits", "global_logits"):
    logw = jax.nn.log_softmax(params[name])
    total = total - jnp.sum(jnp.exp(logw) * logw)
  return total


def kernel_log_ratio(kind: str, e_x, e_c, e_r, **params):
  """log K(e_x, e_c) - log K(e_x, e_r) [B]; `kind` is one of KERNELS or "hmk" (params: params=...)."""
  fn = (lambda x, y: log_hmk(x, y, **params)) if kind == "hmk" else (
      lambda x, y: log_kernel(kind, x, y, **params))
  return fn(e_x, e_c) - fn(e_x, e_r)


MAX_ENTROPY = 3.0 * math.log(2.0)
