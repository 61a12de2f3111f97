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


def two_linear(n_in: int, n_mid: int, n_out: int, with_loss: bool = False):
  """A torch module of two bias-free linear layers `lin1`, `lin2` (the modules the adapter scripts target).
  `with_loss`: forward returns an object with `.loss` (0) and `.logits`, so a PEFT model that adds its own
  penalty to the loss (AdaLoRA) can, as it does for a causal LM."""
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  class TwoLinear(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin1 = torch.nn.Linear(n_in, n_mid, bias=False)
      self.lin2 = torch.nn.Linear(n_mid, n_out, bias=False)

    def forward(self, x):
      y = self.lin2(self.lin1(x))
      return types.SimpleNamespace(loss=torch.zeros(()), logits=y) if with_loss else y

  return TwoLinear()
