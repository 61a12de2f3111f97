"""galore-torch AdamW over a fixed gradient sequence, for several cases in one process.

Inputs (per case i, OUR layout: kernels [in, out]): `w{i}` [in, out], `g{i}` [T, in, out], `b{i}` [out]
(a bias in a plain AdamW group), `gb{i}` [T, out]. Keyword `cases` is a ';'-separated list of
`proj_type,rank,gap,scale,lr,wd,eps` rows. Outputs `w{i}`, `b{i}`: the weights after T steps (our layout).

galore-torch's `adamw.py` and `galore_projector.py` are loaded as submodules of a stub package, because its
`__init__` imports bitsandbytes. The only change to its behaviour: `torch.linalg.svd` returns singular
vectors with a fixed sign (largest-|.| entry of each column of U positive, V flipped alike), the same rule
as `peft._projector.canonical_signs` on the transposed matrix. Signs are arbitrary in LAPACK, and GaLore's
moments carried across a refresh make the trajectory depend on them.
"""
import importlib.util
import os
import sys
import types
import warnings

import torch

from _common import parse_args, save


def load_galore_torch():
  spec = importlib.util.find_spec("galore_torch")
  pkg_dir = os.path.dirname(spec.origin)
  pkg = types.ModuleType("galore_torch")
  pkg.__path__ = [pkg_dir]
  sys.modules["galore_torch"] = pkg  # the stub stops `__init__` (bitsandbytes) from running
  from galore_torch import adamw  # noqa: E402
  return adamw


_svd = torch.linalg.svd


def canonical_svd(a, full_matrices=True, **kw):
  u, s, vh = _svd(a, full_matrices=full_matrices, **kw)
  idx = u.abs().argmax(dim=0, keepdim=True)
  sign = torch.sign(torch.gather(u, 0, idx))
  sign[sign == 0] = 1
  return u * sign, s, vh * sign.reshape(-1, 1)


def main():
  arrays, out, kw = parse_args()
  torch.linalg.svd = canonical_svd
  adamw = load_galore_torch()
  warnings.filterwarnings("ignore", category=FutureWarning)
  results = {}
  for i, row in enumerate(kw["cases"].split(";")):
    proj_type, rank, gap, scale, lr, wd, eps = row.split(",")
    w = torch.nn.Parameter(torch.tensor(arrays[f"w{i}"].T.copy()))  # torch layout [out, in]
    b = torch.nn.Parameter(torch.tensor(arrays[f"b{i}"].copy()))
    groups = [{"params": [b]},
              {"params": [w], "rank": int(rank), "update_proj_gap": int(gap), "scale": float(scale),
               "proj_type": proj_type}]
    opt = adamw.AdamW(groups, lr=float(lr), weight_decay=float(wd), eps=float(eps), betas=(0.9, 0.999),
                      no_deprecation_warning=True)
    for g, gb in zip(arrays[f"g{i}"], arrays[f"gb{i}"]):
      w.grad = torch.tensor(g.T.copy())
      b.grad = torch.tensor(gb.copy())
      opt.step()
    results[f"w{i}"] = w.detach().numpy().T
    results[f"b{i}"] = b.detach().numpy()
  save(out, **results)


if __name__ == "__main__":
  main()
