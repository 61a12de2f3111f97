"""Observability: TensorBoard scalars, a JSONL log, a console progress line, and the loss-curve PNG."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX, no TensorFlow needed) and to `metrics.jsonl`.

  `resume_offset`: the size `metrics.jsonl` had when the checkpoint being resumed was written (`offset()`
  saved with it); the file is cut back to it, so records a killed run wrote after its last checkpoint
  (and a torn last line) are dropped and written again. TensorBoard gets `purge_step` = the resumed step
  + 1, so it too discards what the killed run logged after the checkpoint. `flush()` at every checkpoint.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0, resume_offset: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if start_step == 0:
        resume_offset = 0
      if resume_offset is None:     # a checkpoint from before offsets were saved: cut only a torn line
        resume_offset = _intact_size(self.path)
      if os.path.exists(self.path) and os.path.getsize(self.path) > resume_offset:
        with open(self.path, "r+b") as f:
          f.truncate(resume_offset)
      self._tb = EventFile(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")

  def offset(self) -> int:
    return os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class EventFile:
  """TensorBoard scalars written in the calling thread, so that `flush()` puts every one on disk.

  tensorboardX's SummaryWriter hands events to a background thread through a queue, and its `flush()` does
  not wait for that queue: scalars logged before a checkpoint could still be lost by a kill after it, and
  the resumed run (whose `purge_step` is the checkpoint's step + 1) would not write them again. The file
  format is tensorboardX's; `purge_step` writes the SessionLog START event SummaryWriter writes.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX.event_file_writer import EventsWriter   # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2                  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    self._pb = event_pb2
    # The name holds whole seconds; the fraction (zero-padded, so names sort in time) and the pid keep two
    # writers started within one second from truncating each other's file.
    suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
    self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=suffix)
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(),
                                               session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int):
    from tensorboardX import summary   # pylint: disable=g-import-not-at-top
    self._writer.write_event(self._pb.Event(step=int(step), wall_time=time.time(), summary=summary.scalar(tag, value)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _intact_size(path: str) -> int:
  """The size of `path` up to its last complete line."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  return data.rfind(b"\n") + 1


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file; a torn last line (a run killed while writing it) is left out with a
  warning, a bad line elsewhere raises naming the file and line."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == len(lines) and not line.endswith("\n"):
        print(f"WARNING: {path}:{n}: torn last line (a run killed while writing it) left out", file=sys.stderr)
        break
      raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
  return out


def fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """A one-line console progress bar with loss, tokens/s of real (non-padding) tokens with the padding
  fraction, and an ETA from the steady-state steps: the first update (which includes compilation) only
  starts the clock, so the ETA shows "--:--" until a second one."""

  def __init__(self, total: int, start: int = 0, stream=None):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.t0 = None
    self.step0 = start
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def eta(self, step: int) -> float | None:
    if self.t0 is None or step <= self.step0:
      return None
    rate = (time.perf_counter() - self.t0) / (step - self.step0)
    return rate * (self.total - step)

  def update(self, step: int, loss: float, tokens_per_s: float, padding: float | None = None):
    eta = self.eta(step)
    if self.t0 is None:
      self.t0, self.step0 = time.perf_counter(), step
    frac = step / max(self.total, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    pad = f" (pad {padding:.0%})" if padding is not None else ""
    line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s{pad} "
            f"ETA {'--:--' if eta is None else fmt_time(eta)}")
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
