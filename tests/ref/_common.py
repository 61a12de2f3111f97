"""Shared by the reference scripts (runs inside .venv-ref). Imports nothing of the project."""
import sys

import numpy as np


def parse_args(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  inp, out, rest = argv[0], argv[1], argv[2:]
  kw = dict(a[2:].split("=", 1) for a in rest)
  with np.load(inp, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  return arrays, out, kw


def save(out, **arrays):
  np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})
