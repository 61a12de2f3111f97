"""Initialisations of the low-rank factors, in our [in, out] layout (torch's weight is W^T).

An init is `fn(w, rank, scale, rng) -> (a [in, r], b [r, out], w_res or None)` on one float32 matrix
w [in, out]; `init_factors` vmaps it over stacked layers. w_res, when returned, replaces the frozen base.

  default          A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]), B = 0
  gaussian         A ~ N(0, (1/r)^2) (PEFT: normal_(std=1/r)), B = 0
  pissa            W = U S V^T (top r); S_r <- S_r / s; A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T;
                   W_res = W - s A B   (Meng et al., 2024, "PiSSA", arXiv:2404.02948)
  pissa_niter_<k>  the same from a randomised SVD with k subspace iterations (Halko et al., 2011;
                   torch.svd_lowrank with q = r, as PEFT calls it)
  eva, lora_ga, .. the default here (every data-driven init registered with `peft.register_data_init`);
                   replaced from calibration batches by the `data_init` host hook (peft/_data_init.py)
  olora            QR of the torch weight W^T = Q R: lora_B = Q[:, :r], lora_A = R[:r]; in our layout
                   A = R[:r]^T, B = Q[:, :r]^T; W_res = W - s A B   (Büyükakyüz, 2024, "OLoRA",
                   arXiv:2406.01775)

Every SVD and QR runs in float32. Singular vectors are defined up to sign: compare PiSSA factors with
another implementation through sign-invariant products (u_i s_i v_i^T) or after aligning signs.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp

InitFn = Callable[..., tuple]
_INITS: dict[str, InitFn] = {}
RESIDUAL_INITS = ("pissa", "olora")   # inits that move part of W into the adapter (prefixes)


def register_init(name: str):
  def deco(fn):
    _INITS[name] = fn
    return fn
  return deco


def init_names() -> list[str]:
  return sorted(_INITS) + ["pissa_niter_<k>"]


def get_init(name: str) -> InitFn:
  m = re.fullmatch(r"pissa_niter_(\d+)", name or "")
  if m:
    niter = int(m.group(1))
    return lambda w, rank, scale, rng: pissa(w, rank, scale, rng, niter=niter)
  if name not in _INITS:
    raise ValueError(f"unknown adapter init {name!r}; valid: {', '.join(init_names())}")
  return _INITS[name]


def is_residual(name: str) -> bool:
  return any((name or "").startswith(p) for p in RESIDUAL_INITS)


def init_factors(name: str, w: jax.Array, rank: int, scale: float, rng: jax.Array
                 ) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
  """Runs init `name` on every matrix of w [..., in, out] (float32); one key per matrix."""
  fn = get_init(name)
  lead = w.shape[:-2]
  if min(w.shape[-2:]) < rank and is_residual(name):
    raise ValueError(f"init {name!r} needs rank <= min(in, out) = {min(w.shape[-2:])}, got {rank}")
  flat = w.reshape((-1,) + w.shape[-2:]).astype(jnp.float32)
  keys = jax.random.split(rng, flat.shape[0])
  a, b, res = jax.vmap(lambda m, k: _with_res(fn(m, rank, scale, k), m))(flat, keys)
  unflat = lambda x: x.reshape(lead + x.shape[1:])
  return unflat(a), unflat(b), (unflat(res) if is_residual(name) else None)


def _with_res(out, w):
  a, b, res = out
  return a, b, (w if res is None else res)


@register_init("default")
def default(w, rank, scale, rng):
  del scale
  bound = 1.0 / math.sqrt(w.shape[0])
  a = jax.random.uniform(rng, (w.shape[0], rank), jnp.float32, -bound, bound)
  return a, jnp.zeros((rank, w.shape[1]), jnp.float32), None


def data_driven(w, rank, scale, rng):
  """Placeholder of the data-driven inits (registered by `peft.register_data_init`): the default factors,
  which the trainer's `data_init` host hook (train_lib/data_init.py) replaces from calibration batches before
  the first step."""
  return default(w, rank, scale, rng)


@register_init("gaussian")
def gaussian(w, rank, scale, rng):
  del scale
  a = jax.random.normal(rng, (w.shape[0], rank), jnp.float32) / rank
  return a, jnp.zeros((rank, w.shape[1]), jnp.float32), None


def randomized_svd(w: jax.Array, rank: int, niter: int, rng: jax.Array):
  """Top-`rank` SVD of w from a random range finder with `niter` subspace iterations (torch.svd_lowrank's
  algorithm: Q = orth(W R), then Q <- orth(W orth(W^T Q)) niter times, SVD of Q^T W)."""
  omega = jax.random.normal(rng, (w.shape[1], rank), w.dtype)
  q, _ = jnp.linalg.qr(w @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ z)
  u, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u, s, vt


@register_init("pissa")
def pissa(w, rank, scale, rng, niter: Optional[int] = None):
  if niter is None:
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  else:
    u, s, vt = randomized_svd(w, rank, niter, rng)
  sr = s[:rank] / scale
  a = u[:, :rank] * jnp.sqrt(sr)
  b = jnp.sqrt(sr)[:, None] * vt[:rank]
  return a, b, w - scale * a @ b


@register_init("olora")
def olora(w, rank, scale, rng):
  del rng
  q, r = jnp.linalg.qr(w.T)       # torch's weight is w.T [out, in]
  a, b = r[:rank].T, q[:, :rank].T
  return a, b, w - scale * a @ b
