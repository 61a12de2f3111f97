"""PEFT `LoraModel.add_weighted_adapter` on a one-layer model (runs inside .venv-ref).

    peft_lora_combine.py IN.npz OUT.npz --cases=JSON

IN: `a{i}` [in, r_i] and `b{i}` [r_i, out] (our layout: PEFT's lora_A is a^T, lora_B is b^T) of adapter i.
cases: a JSON list of {"combination_type", "weights", "alphas" (lora_alpha of each adapter), "svd_rank",
"density"}. OUT: `delta{c}` [in, out], the merged adapter's `get_delta_weight` transposed to our layout.
"""
import json

import numpy as np
import peft
import torch
from _common import parse_args, save


def main():
  arrays, out, kw = parse_args()
  n = len([k for k in arrays if k.startswith("a")])
  din, dout = arrays["a0"].shape[0], arrays["b0"].shape[1]
  results = {}
  for c, case in enumerate(json.loads(kw["cases"])):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(din, dout, bias=False))
    pm = None
    for i in range(n):
      cfg = peft.LoraConfig(r=arrays[f"a{i}"].shape[1], lora_alpha=case["alphas"][i], target_modules=["proj"],
                            init_lora_weights=False)
      if pm is None:
        pm = peft.get_peft_model(model, cfg, adapter_name=f"x{i}")
      else:
        pm.add_adapter(f"x{i}", cfg)
      layer = pm.base_model.model.proj
      with torch.no_grad():
        layer.lora_A[f"x{i}"].weight.copy_(torch.from_numpy(arrays[f"a{i}"].T.copy()))
        layer.lora_B[f"x{i}"].weight.copy_(torch.from_numpy(arrays[f"b{i}"].T.copy()))
    extra = {k: case[k] for k in ("svd_rank", "density") if case.get(k) is not None}
    pm.add_weighted_adapter([f"x{i}" for i in range(n)], case["weights"], "merged",
                            combination_type=case["combination_type"], **extra)
    delta = pm.base_model.model.proj.get_delta_weight("merged")
    results[f"delta{c}"] = delta.detach().float().numpy().T
  save(out, **results)


if __name__ == "__main__":
  main()
