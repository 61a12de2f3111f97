r"""Power-law fit of an eigenvalue spectrum: the continuous MLE (Hill) exponent alpha and its xmin.

Given ascending eigenvalues lambda_0 <= ... <= lambda_{N-1} and a candidate xmin = lambda_i (tail size
n = N - i), the continuous power-law MLE and the Kolmogorov-Smirnov distance of the fit are

    alpha_i = 1 + n / sum_{j>=i} ln(lambda_j / lambda_i)
    D_i     = max_{k<n} | 1 - (lambda_{i+k} / lambda_i)^(1 - alpha_i) - k / n |
    sigma_i = (alpha_i - 1) / sqrt(n)                                   (WeightWatcher's error bar)

(Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 2009; used as is by
WeightWatcher, TempBalance and Model Balancing). The choice of xmin is the one degree of freedom; alphas
fitted under different rules are not comparable:

  median            i = N_0 + floor(m / xmin_pos) over the m kept eigenvalues starting at N_0 (TempBalance
                    `pl_fitting='median'`, Model Balancing `xmin_mid`). One fit, static shapes: jit-able.
  goodness_of_fit   every i <= N - 2 is a candidate; D_i = 1 where alpha_i <= 1; take the first argmin of D
                    (WeightWatcher's default `WWFit`, TempBalance `'goodness-of-fit'`).
  fix_finger        the same scan restricted to lambda_i in [0.95 p, 1.5 p], where p = 10^(left edge of the
                    fullest of `bins` histogram bins of log10 lambda) (`xmin_peak` / `'fix-finger'`). The
                    references compare lambda with log10(0.95 p), so the lower bound almost never binds;
                    `compat_fix_finger_bug=True` reproduces that comparison.

Fingers (`clip_xmax=True`; WeightWatcher `fix_fingers='clip_xmax'`, `RMT_Util.fit_clipped_powerlaw`, off
by default as there). A few outlying top eigenvalues (a "finger" of the ESD, a finite-size effect) can
inflate alpha. With F the fit of the whole kept spectrum, the fit is redone without the top c eigenvalues
for c = 2, 3, ..., max_fingers - 1 (WeightWatcher starts at 2 and stops before max_fingers = 10); the first
clipped fit with alpha_c + finger_thresh < alpha_F is kept (num_fingers = c - 1, WeightWatcher's count),
and the search stops without a clip at the first alpha_c <= min_alpha (2.0). Each fit uses the `mode`'s
xmin rule on the clipped spectrum (WeightWatcher's is goodness_of_fit). WeightWatcher 0.7.7 replaces any
max_fingers below N/2 by 10, so its `max_fingers` option is in effect always 10 on real layers; ours is
used as given.

All alpha_i come in O(N) from suffix sums of ln lambda; the D_i of the scan cost O(N^2) and are evaluated
in row chunks (`lax.map` under jit, a loop in numpy), so memory stays O(chunk * N).

Every function takes a numpy array (evaluated on the host in its dtype, float64 for fixtures) or a jax
array (traced; float32 on device). The zero filter is a count `num_valid` of kept (largest) eigenvalues,
so shapes never depend on the data.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("median", "goodness_of_fit", "fix_finger")


class PowerLawFit(NamedTuple):
  alpha: jax.Array    # () exponent; NaN when no candidate xmin exists
  D: jax.Array        # () KS distance of the chosen fit
  xmin: jax.Array     # () lambda at the chosen xmin
  sigma: jax.Array    # () (alpha - 1) / sqrt(n_tail)
  index: jax.Array    # () int32, position of xmin in the ascending spectrum
  n_tail: jax.Array   # () int32, N - index (N of the clipped spectrum with clip_xmax)
  num_fingers: jax.Array  # () int32, clip_xmax: WeightWatcher's num_fingers (clipped eigenvalues - 1); else 0


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def hill_alphas(log_lam):
  """alpha_i for every candidate i from one suffix sum. log_lam: [N] ascending; alpha_{N-1} is inf."""
  xp = _xp(log_lam)
  N = log_lam.shape[-1]
  # Centre on the top eigenvalue: the suffix sums then stay small where the tail is short, which is where
  # a float32 cancellation would hurt.
  centred = log_lam - log_lam[-1]
  suffix = xp.cumsum(centred[::-1])[::-1]
  n = (N - xp.arange(N)).astype(log_lam.dtype)
  return 1.0 + n / (suffix - n * centred)


def ks_rows(log_lam, alphas, rows):
  """D_i for the candidates `rows` ([C] int) with exponents `alphas` ([C])."""
  xp = _xp(log_lam)
  N = log_lam.shape[-1]
  j = xp.arange(N)
  k = j[None, :] - rows[:, None]
  n = (N - rows)[:, None].astype(log_lam.dtype)
  t = (1.0 - alphas[:, None]) * (log_lam[None, :] - log_lam[rows][:, None])
  fitted = 1.0 - xp.exp(xp.where(k >= 0, t, 0.0))
  dist = xp.abs(fitted - k.astype(log_lam.dtype) / n)
  return xp.max(xp.where(k >= 0, dist, 0.0), axis=1)


def _scan_distances(log_lam, alphas, live, chunk: int):
  """D_i where `live` (alpha_i > 1 on a candidate), 1 elsewhere."""
  N = log_lam.shape[-1]
  if isinstance(log_lam, np.ndarray):
    out = np.ones(N, log_lam.dtype)
    rows = np.flatnonzero(live)
    for s in range(0, rows.size, chunk):
      r = rows[s:s + chunk]
      out[r] = ks_rows(log_lam, alphas[r], r)
    return out
  num_chunks = -(-N // chunk)
  rows = jnp.minimum(jnp.arange(num_chunks * chunk), N - 1).reshape(num_chunks, chunk)
  safe = jnp.where(live, alphas, 2.0)     # keeps dead rows finite; they are masked below
  d = jax.lax.map(lambda r: ks_rows(log_lam, safe[r], r), rows).reshape(-1)[:N]
  return jnp.where(live, d, 1.0)


def finger_window(lam, valid, bins: int = 100, compat_fix_finger_bug: bool = False):
  """Mask of the xmin candidates allowed by the histogram-peak ("fix-finger") rule."""
  xp = _xp(lam)
  with np.errstate(divide="ignore"):
    log10 = xp.log10(lam)
  if xp is np:
    counts, edges = np.histogram(log10[valid], bins=bins)
  else:
    lo = jnp.min(jnp.where(valid, log10, jnp.inf))
    hi = jnp.max(jnp.where(valid, log10, -jnp.inf))
    x = jnp.where(valid, log10, lo)
    counts, edges = jnp.histogram(x, bins=bins, range=(lo, hi), weights=valid.astype(lam.dtype))
  peak = 10.0 ** edges[xp.argmax(counts)]
  # The references build the bound as log10(0.95 p) and compare it with a linear lambda.
  lower = xp.log10(0.95 * peak) if compat_fix_finger_bug else 0.95 * peak
  return valid & (lam >= lower) & (lam <= 1.5 * peak)


def fit_powerlaw(lam, *, mode: str = "median", xmin_pos: float = 2.0, num_valid=None, bins: int = 100,
                 compat_fix_finger_bug: bool = False, chunk: int = 256, clip_xmax: bool = False,
                 max_fingers: int = 10, finger_thresh: float = 1.0, min_alpha: float = 2.0) -> PowerLawFit:
  """Fits the tail of one ascending spectrum `lam` [N].

  Args:
    lam: eigenvalues, ascending, >= 0. numpy (host, its dtype) or jax (traceable).
    mode: one of MODES (see the module docstring).
    xmin_pos: median mode: xmin sits at 1/xmin_pos of the kept spectrum (2 = its middle).
    num_valid: how many of the largest eigenvalues to keep (the zero filter); default all.
    bins, compat_fix_finger_bug: fix_finger mode only.
    chunk: rows of the O(N^2) KS scan evaluated at once.
    clip_xmax, max_fingers, finger_thresh, min_alpha: WeightWatcher's finger clipping (module docstring).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {MODES}")
  kw = dict(mode=mode, xmin_pos=xmin_pos, bins=bins, compat_fix_finger_bug=compat_fix_finger_bug, chunk=chunk)
  if clip_xmax:
    return _fit_clipped(lam, num_valid, kw, max_fingers, finger_thresh, min_alpha)
  return _fit_one(lam, num_valid=num_valid, **kw)


def _fit_clipped(lam, num_valid, kw, max_fingers: int, finger_thresh: float, min_alpha: float) -> PowerLawFit:
  """WeightWatcher's clip_xmax search, as a fixed sequence of fits (static shapes: jit-able)."""
  xp = _xp(lam)
  N = lam.shape[-1]
  m = N if num_valid is None else num_valid
  first = _fit_one(lam, num_valid=m, **kw)
  best, done = first, xp.asarray(False)
  for c in range(2, max_fingers):
    if N - c < 2:
      break
    f = _fit_one(lam[:N - c], num_valid=m - c, **kw)._replace(num_fingers=xp.asarray(c - 1, xp.int32))
    take = ~done & (m - c >= 2) & (f.alpha + finger_thresh < first.alpha)
    best = PowerLawFit(*[xp.where(take, a, b) for a, b in zip(f, best)])
    done = done | take | (f.alpha <= min_alpha)
  return best


def _fit_one(lam, *, mode, xmin_pos, num_valid, bins, compat_fix_finger_bug, chunk) -> PowerLawFit:
  xp = _xp(lam)
  N = lam.shape[-1]
  idx = xp.arange(N)
  m = N if num_valid is None else num_valid
  first = N - m
  valid = idx >= first
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    log_lam = xp.log(lam)
    alphas = hill_alphas(log_lam)
    if mode == "median":
      best = first + xp.floor(m / xmin_pos).astype(idx.dtype)
      best = xp.minimum(best, N - 1)
      alpha = alphas[best]
      D = ks_rows(log_lam, alpha[None], best[None])[0]
      found = m >= 2
    else:
      cand = valid & (idx <= N - 2)
      if mode == "fix_finger":
        cand = cand & finger_window(lam, valid, bins, compat_fix_finger_bug)
      live = cand & (alphas > 1.0) & xp.isfinite(alphas)
      dists = xp.where(cand, _scan_distances(log_lam, alphas, live, chunk), xp.inf)
      best = xp.argmin(dists)
      alpha, D = alphas[best], dists[best]
      found = xp.any(cand)
    n_tail = N - best
    alpha = xp.where(found, alpha, xp.nan)
    sigma = (alpha - 1.0) / xp.sqrt(xp.asarray(n_tail, lam.dtype))
  return PowerLawFit(alpha, D, lam[best], sigma, xp.asarray(best, xp.int32), xp.asarray(n_tail, xp.int32),
                     xp.asarray(0, xp.int32))


def spectral_metrics(lam, alpha, num_valid: Optional[int] = None) -> dict:
  """Norm-type metrics of one ascending spectrum (not scale-free: no 1/N normalisation is applied).

  WeightWatcher's (over all eigenvalues): alpha_weighted = alpha log10 lambda_max, log_alpha_norm =
  log10 sum lambda^alpha, spectral_norm = lambda_max, norm = sum lambda = ||W||_F^2, stable_rank =
  norm / lambda_max. Model Balancing's (over the kept eigenvalues): norm_stable_rank = sum lambda / m,
  eig_ratio = lambda_max / lambda_{m // 2}.
  """
  xp = _xp(lam)
  N = lam.shape[-1]
  m = N if num_valid is None else num_valid
  top = lam[-1]
  log_top = xp.log10(top)
  norm = xp.sum(lam)
  kept = xp.where(xp.arange(N) >= N - m, lam, 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    # log10 sum lambda^alpha without overflowing float32: factor lambda_max^alpha out.
    log_alpha_norm = alpha * log_top + xp.log10(xp.sum((lam / top) ** alpha))
    return dict(alpha_weighted=alpha * log_top, log_alpha_norm=log_alpha_norm, spectral_norm=top,
                norm=norm, stable_rank=norm / top, norm_stable_rank=xp.sum(kept) / m,
                eig_ratio=top / lam[N - m + m // 2])
