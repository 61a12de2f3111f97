"""Observability: TensorBoard scalars, a JSONL log, a console progress line, and the loss-curve PNG."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX, no TensorFlow needed) and to `metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


class Progress:
  """A one-line console progress bar with loss, tokens/s and ETA (plain lines when not a terminal)."""

  def __init__(self, total: int, start: int = 0, stream=None):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step: int, loss: float, tokens_per_s: float):
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    frac = step / max(self.total, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    if self.tty:
      self.stream.write("\r" + line)
      if step >= self.total:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


def plot_curves(records: list[dict], path: str, keys=("loss", "eval/loss", "eval/exact_match")) -> str | None:
  """Saves the loss (and eval) curves from the JSONL records as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
  series = {k: v for k, v in series.items() if v}
  if not series:
    return None
  fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
  for ax, (k, pts) in zip(axes[0], series.items()):
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
