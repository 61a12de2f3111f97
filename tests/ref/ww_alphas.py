"""WeightWatcher `analyze` on a list of matrices (runs inside .venv-ref).

    ww_alphas.py IN.npz OUT.npz [--fix_fingers=xmin_peak|clip_xmax] [--pl_package=ww] [--min_evals=8]

IN holds m0, m1, ... (Flax `[in, out]` kernels; each becomes one `nn.Linear` whose weight is the transpose,
and spectra do not care). OUT holds, per matrix in input order, the columns of WW's details frame; a matrix
WW did not analyse (too few eigenvalues) gets NaN everywhere and `analysed = 0`. With clip_xmax, OUT also
holds WW's `num_fingers`.
"""
import logging
import warnings

import numpy as np
from _common import parse_args, save

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
import weightwatcher as ww  # noqa: E402

COLUMNS = ("alpha", "xmin", "D", "sigma", "num_evals", "alpha_weighted", "log_alpha_norm", "spectral_norm",
           "stable_rank", "norm")


def main():
  arrays, out, kw = parse_args()
  names = sorted(arrays, key=lambda k: int(k[1:]))
  layers = torch.nn.ModuleList()
  for k in names:
    w = arrays[k]
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
    layers.append(lin)
  model = torch.nn.Sequential(*layers)

  fix_fingers = kw.get("fix_fingers", "none")
  options = dict(min_evals=int(kw.get("min_evals", 8)), pl_package=kw.get("pl_package", "ww"),
                 fix_fingers=False if fix_fingers == "none" else fix_fingers)
  details = ww.WeightWatcher(model=model).analyze(**options)

  result = {c: np.full(len(names), np.nan) for c in COLUMNS}
  result["analysed"] = np.zeros(len(names))
  columns = COLUMNS + (("num_fingers",) if "num_fingers" in details.columns else ())
  result.update({c: np.full(len(names), np.nan) for c in columns if c not in result})
  for _, row in details.iterrows():
    i = int(row["longname"])            # Sequential children are named "0", "1", ...
    result["analysed"][i] = 1.0
    for c in columns:
      result[c][i] = float(row[c])
  save(out, **result)


if __name__ == "__main__":
  main()
