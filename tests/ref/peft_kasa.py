"""HF PEFT's KaSA (LoraConfig(kasa_config=KasaConfig(...))) on a two-layer torch module (runs in .venv-ref).

    peft_kasa.py IN.npz OUT.npz --r=3 --alpha=6 --beta=1e-4 --gamma=1e-3

IN: x [N, in]; for m in (lin1, lin2): `m__w` [out, in] (the base weight before truncation), `m__A` [r, in],
`m__B` [out, r], `m__diag` [r] (the adapter, copied in after PEFT built and truncated the layer).
OUT: `m__base` (the truncated base weight PEFT keeps), `y` (lin2(lin1(x)) unmerged), `loss` (the
model's `_get_kasa_loss()`), `y_merged` and `m__merged` (after merging).
"""
import numpy as np
import peft
import torch

from _common import parse_args, save, two_linear

MODULES = ("lin1", "lin2")


def main():
  arrays, out, kw = parse_args()
  t = lambda k: torch.as_tensor(arrays[k], dtype=torch.float32)
  w1, w2 = arrays["lin1__w"], arrays["lin2__w"]
  model = two_linear(w1.shape[1], w1.shape[0], w2.shape[0])
  with torch.no_grad():
    model.lin1.weight.copy_(t("lin1__w"))
    model.lin2.weight.copy_(t("lin2__w"))
  cfg = peft.LoraConfig(r=int(kw["r"]), lora_alpha=float(kw["alpha"]), target_modules=list(MODULES),
                        lora_dropout=0.0, kasa_config=peft.KasaConfig(beta=float(kw["beta"]),
                                                                      gamma=float(kw["gamma"])))
  pm = peft.get_peft_model(model, cfg)
  layers = {m: getattr(pm.base_model.model, m) for m in MODULES}
  res = {}
  with torch.no_grad():
    for m, layer in layers.items():
      layer.lora_A["default"].weight.copy_(t(f"{m}__A"))
      layer.lora_B["default"].weight.copy_(t(f"{m}__B"))
      layer.lora_diag["default"].copy_(t(f"{m}__diag"))
      res[f"{m}__base"] = layer.get_base_layer().weight.detach().numpy().copy()
    x = t("x")
    res["y"] = pm(x).numpy()
    res["loss"] = np.asarray(float(pm.base_model._get_kasa_loss()))
    for layer in layers.values():
      layer.merge()
    res["y_merged"] = model(x).numpy()
    for m, layer in layers.items():
      res[f"{m}__merged"] = layer.get_base_layer().weight.detach().numpy().copy()
  save(out, **res)


if __name__ == "__main__":
  main()
