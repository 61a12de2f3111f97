"""mergekit 0.1.5 merges of single tensors through its Python API (runs inside .venv-ref).

    mergekit_merge.py IN.npz OUT.npz --cases=JSON

cases: a JSON list of {"method": name, "n": number of input tensors, "base_index": int or null,
"parameters": {...}} passed to `mergekit.merge_methods.merge_tensors(tensors, method, parameters=...,
base_index=...)`. IN: case c's inputs `c{c}_t{i}` (float32, torch layout) and, for the random sparsifiers
(DARE, DELLA), the masks `c{c}_m{j}` that `torch.bernoulli` returns in call order instead of sampling, so
both sides drop the same entries. OUT: `c{c}_out` and the probability tensors that mergekit passed to
`torch.bernoulli`, `c{c}_p{j}` (DELLA's rank-based keep probabilities).
"""
import json

import numpy as np
import torch
from _common import parse_args, save

from mergekit.merge_methods import merge_tensors


def main():
  arrays, out, kw = parse_args()
  results = {}
  real_bernoulli = torch.bernoulli
  for c, case in enumerate(json.loads(kw["cases"])):
    masks = [torch.from_numpy(arrays[f"c{c}_m{j}"]) for j in range(case.get("masks", 0))]
    probs = []

    def fake_bernoulli(p, *args, **kwargs):
      if not masks:
        return real_bernoulli(p, *args, **kwargs)
      m = masks.pop(0)
      if m.numel() != p.numel():
        raise SystemExit(f"case {c}: mask shape {tuple(m.shape)} != bernoulli input {tuple(p.shape)}")
      probs.append(p.detach().float().reshape(m.shape).numpy().copy())   # DELLA adds a row axis to 1-D
      return m.reshape(p.shape).to(p.dtype)

    torch.bernoulli = fake_bernoulli
    tensors = [torch.from_numpy(arrays[f"c{c}_t{i}"]) for i in range(case["n"])]
    res = merge_tensors(tensors, case["method"], parameters=case.get("parameters", {}),
                        base_index=case.get("base_index"))
    torch.bernoulli = real_bernoulli
    if masks:
      raise SystemExit(f"case {c}: {len(masks)} masks were not consumed")
    results[f"c{c}_out"] = res.float().numpy()
    for j, p in enumerate(probs):
      results[f"c{c}_p{j}"] = p
  save(out, **results)


if __name__ == "__main__":
  main()
