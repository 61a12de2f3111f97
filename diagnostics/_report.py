r"""HT-SR reports: the records of `analyze` as rows (CSV / JSON), a text table, and two kinds of plot.

    rows = diagnostics.record_rows(records)          # one dict per matrix and per slice
    diagnostics.write_csv(rows, "alphas.csv")
    print(diagnostics.format_table(records))          # alpha per block x projection
    diagnostics.plot_alpha_per_layer(records, "alpha_per_layer.png")
    diagnostics.plot_esd(lam, record, "esd_0_q_proj.png")

The ESD plot draws the density of the eigenvalues lambda on log-log axes (log-spaced bins) and, over the
tail lambda >= xmin, the fitted continuous power law scaled to the tail's share of the spectrum,

    p(lambda) = (n_tail / n) (alpha - 1) / xmin (lambda / xmin)^(-alpha),

which is a straight line of slope -alpha from xmin on (Clauset, Shalizi & Newman, SIAM Review 2009; the
plots of WeightWatcher, Martin & Mahoney, JMLR 2021). A good fit follows the histogram's right flank.

Columns: the fit (alpha, D the KS distance, xmin, sigma, n_tail), N = min(in, out) eigenvalues, n_valid
after the zero filter, WeightWatcher's norm metrics (alpha_weighted, log_alpha_norm, spectral_norm = lambda_max,
norm = sum lambda = ||W||_F^2, stable_rank), frobenius_norm = sqrt(norm), Model Balancing's norm_stable_rank
and eig_ratio, and `skipped` (why no schedule uses the record: eigs_thresh, first, last, no_adapter...).
"""
from __future__ import annotations

import csv
import json
import math
from typing import Optional, Sequence

import numpy as np

COLUMNS = ("path", "name", "layer", "shape", "N", "n_valid", "alpha", "D", "xmin", "sigma", "n_tail",
           "alpha_weighted", "log_alpha_norm", "spectral_norm", "stable_rank", "norm", "frobenius_norm",
           "norm_stable_rank", "eig_ratio", "skipped")
FLOAT_COLUMNS = ("alpha", "D", "xmin", "sigma", "alpha_weighted", "log_alpha_norm", "spectral_norm",
                 "stable_rank", "norm", "frobenius_norm", "norm_stable_rank", "eig_ratio")


def matrix_name(path: str) -> str:
  """The module a kernel belongs to: `layers/attn/q_proj/kernel` -> `q_proj`."""
  parts = path.split("/")
  return parts[-2] if len(parts) > 1 and parts[-1] in ("kernel", "embedding") else parts[-1]


# ---------------------------------------------------------------------------------------------------
# Rows and files
# ---------------------------------------------------------------------------------------------------
def record_rows(records) -> list[dict]:
  """One flat dict per record, keyed by COLUMNS (floats as Python floats, NaN where not fitted)."""
  rows = []
  for r in records:
    m = r.metrics
    rows.append(dict(
        path=r.path, name=matrix_name(r.path), layer=r.layer, shape="x".join(map(str, r.shape)),
        N=r.n_evals, n_valid=r.n_valid, alpha=r.alpha, D=r.D, xmin=r.xmin, sigma=r.sigma, n_tail=r.n_tail,
        alpha_weighted=m["alpha_weighted"], log_alpha_norm=m["log_alpha_norm"],
        spectral_norm=m["spectral_norm"], stable_rank=m["stable_rank"], norm=m["norm"],
        frobenius_norm=math.sqrt(m["norm"]) if m["norm"] >= 0 else float("nan"),
        norm_stable_rank=m["norm_stable_rank"], eig_ratio=m["eig_ratio"], skipped=r.skipped or ""))
  return rows


def write_csv(rows: Sequence[dict], path: str) -> str:
  """Floats go out as repr, so reading them back gives the same doubles."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
      w.writerow({k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                  for k in COLUMNS})
  return path


def read_csv(path: str) -> list[dict]:
  """The rows of `write_csv`, typed back (layer None where empty, NaN floats)."""
  ints = ("N", "n_valid", "n_tail")
  out = []
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      row = dict(row)
      row["layer"] = int(row["layer"]) if row["layer"] != "" else None
      row.update({k: int(row[k]) for k in ints})
      row.update({k: float(row[k]) for k in FLOAT_COLUMNS})
      out.append(row)
  return out


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None                          # strict JSON has no NaN / inf
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.generic):
    return _json_safe(x.item())
  return x


def write_json(path: str, **content) -> str:
  """Strict JSON (NaN and inf written as null)."""
  with open(path, "w") as f:
    json.dump(_json_safe(content), f, indent=2)
  return path


# ---------------------------------------------------------------------------------------------------
# Text table
# ---------------------------------------------------------------------------------------------------
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layout(records):
  """(names in forward order, blocks, {(block, name): record}) over the records that belong to a block."""
  names, blocks, cell = [], set(), {}
  for r in records:
    if r.layer is None:
      continue
    n = matrix_name(r.path)
    if n not in names:
      names.append(n)
    blocks.add(r.layer)
    cell[(r.layer, n)] = r
  seen = {n: i for i, n in enumerate(names)}
  names = sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), seen[n]))
  return names, sorted(blocks), cell


def format_table(records) -> str:
  """alpha per block (rows) and projection (columns), `-` where skipped; then the other matrices."""
  names, blocks, cell = _layout(records)
  width = max([8] + [len(n) + 1 for n in names])
  head = "block " + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}"
  lines = [head]
  for b in blocks:
    vals, used = [], []
    for n in names:
      r = cell.get((b, n))
      if r is None or not np.isfinite(r.alpha):
        vals.append(f"{'-':>{width}}")
        continue
      mark = "" if r.skipped is None else "*"
      vals.append(f"{r.alpha:>{width - 1}.3f}{mark or ' '}")
      if r.skipped is None:
        used.append(r.alpha)
    mean = f"{np.mean(used):>{width}.3f}" if used else f"{'-':>{width}}"
    lines.append(f"{b:>5} " + "".join(vals) + mean)
  for r in records:
    if r.layer is None:
      a = f"{r.alpha:.3f}" if np.isfinite(r.alpha) else "-"
      lines.append(f"{r.path}: alpha {a}" + (f" ({r.skipped})" if r.skipped else ""))
  skipped = {}
  for r in records:
    if r.skipped:
      skipped[r.skipped] = skipped.get(r.skipped, 0) + 1
  used = [r.alpha for r in records if r.skipped is None]
  foot = f"{len(records)} matrices, {len(used)} fitted and scheduled"
  if used:
    foot += f", mean alpha {np.mean(used):.3f}"
  if skipped:
    foot += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    foot += " (* = fitted but excluded)"
  lines.append(foot)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------
def _pyplot():
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  return plt


def plot_alpha_per_layer(records, path: str, title: Optional[str] = None) -> Optional[str]:
  """alpha against the decoder block, one line per projection type, and the block mean (scheduled only).

  Excluded records (first / last) are drawn hollow; a NaN alpha leaves a gap. Returns None when no
  record belongs to a block.
  """
  names, blocks, cell = _layout(records)
  if not blocks:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for n in names:
    xs = np.asarray(blocks)
    ys = np.asarray([cell[(b, n)].alpha if (b, n) in cell else np.nan for b in blocks], float)
    line, = ax.plot(xs, ys, marker="o", label=n, alpha=0.85)
    off = [b for b in blocks if (b, n) in cell and cell[(b, n)].skipped in ("first", "last")]
    if off:
      ax.plot(off, [cell[(b, n)].alpha for b in off], "o", mfc="white", mec=line.get_color(), ms=9)
  mean = [np.mean([cell[(b, n)].alpha for n in names if (b, n) in cell and cell[(b, n)].skipped is None]
                  or [np.nan]) for b in blocks]
  ax.plot(blocks, mean, "k--", lw=2, label="block mean")
  ax.axhline(2.0, color="grey", lw=0.8, ls=":")   # WeightWatcher's "well trained" mark
  ax.set_xlabel("decoder block")
  ax.set_ylabel("power-law alpha")
  ax.set_xticks(blocks)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def tail_density(lam_grid, alpha: float, xmin: float, tail_fraction: float):
  """The fitted power-law density over the whole spectrum's scale: zero below xmin."""
  lam_grid = np.asarray(lam_grid, float)
  p = tail_fraction * (alpha - 1.0) / xmin * (lam_grid / xmin) ** (-alpha)
  return np.where(lam_grid >= xmin, p, 0.0)


def plot_esd(lam, record, path: str, bins: int = 60) -> str:
  """Histogram density of the eigenvalues (log-log), the fitted tail from xmin, xmin marked."""
  lam = np.sort(np.asarray(lam, np.float64))
  lam = lam[len(lam) - record.n_valid:]                    # the eigenvalues the fit saw
  pos = lam[lam > 0]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  if len(pos):
    lo, hi = np.log10(pos[0]), np.log10(pos[-1])
    edges = np.logspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    counts, edges = np.histogram(pos, bins=edges)
    dens = counts / (len(lam) * np.diff(edges))
    ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.6,
           label=f"ESD ({len(lam)} eigenvalues)")
  fitted = np.isfinite(record.alpha) and np.isfinite(record.xmin) and record.xmin > 0
  if fitted:
    grid = np.logspace(np.log10(record.xmin), np.log10(lam[-1]), 100)
    grid[0] = record.xmin                                   # logspace may round just below xmin
    ax.plot(grid, tail_density(grid, record.alpha, record.xmin, record.n_tail / len(lam)), "r-", lw=2,
            label=f"power law alpha={record.alpha:.3f} (D={record.D:.3f}, tail {record.n_tail})")
    ax.axvline(record.xmin, color="r", ls="--", lw=1, label=f"xmin={record.xmin:.4g}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("eigenvalue lambda = sigma^2")
  ax.set_ylabel("density")
  where = record.path + (f"[{record.layer}]" if record.layer is not None else "")
  note = "" if record.skipped is None else f" (skipped: {record.skipped})"
  ax.set_title(f"{where} {record.shape[0]}x{record.shape[1]}{note}", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
