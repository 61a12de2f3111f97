"""HF PEFT's AdaLoRA on a two-layer torch module with given weights (runs in .venv-ref).

    peft_adalora.py IN.npz OUT.npz --init_r=4 --target_r=2 --alpha=3 --total_step=10 --tinit=2 --tfinal=3
                                   --deltaT=2 --beta1=0.85 --beta2=0.85 --orth_reg_weight=0.5 --steps=S

IN: x [N, in]; for m in (lin1, lin2): `m__w` [out, in] (the base weight), `m__A` [r, in], `m__E` [r],
`m__B` [out, r] (the adapter, forward checks), and for t < S: `t{t}__m__{A,E,B}` (parameter values after the
step) and `t{t}__m__g{A,E,B}` (their gradients) for the rank allocator.
OUT: `y` (lin2(lin1(x)) with the adapters, unmerged), `y_merged` and `m__merged` (after merging), `orth` (the
penalty AdaLoraModel.forward adds to the loss), and for each t after `update_and_allocate(t)`:
`t{t}__m__E` (Λ after masking), `t{t}__budget` (RankAllocator.budget_schedule(t)[0]).
"""

import numpy as np
import peft
import torch

from _common import parse_args, save, two_linear

MODULES = ("lin1", "lin2")


def main():
  arrays, out, kw = parse_args()
  t = lambda k: torch.as_tensor(arrays[k], dtype=torch.float32)
  x = t("x")
  w1, w2 = arrays["lin1__w"], arrays["lin2__w"]
  model = two_linear(w1.shape[1], w1.shape[0], w2.shape[0], with_loss=True)
  with torch.no_grad():
    model.lin1.weight.copy_(t("lin1__w"))
    model.lin2.weight.copy_(t("lin2__w"))
  cfg = peft.AdaLoraConfig(init_r=int(kw["init_r"]), target_r=int(kw["target_r"]), lora_alpha=float(kw["alpha"]),
                           target_modules=list(MODULES), total_step=int(kw["total_step"]), tinit=int(kw["tinit"]),
                           tfinal=int(kw["tfinal"]), deltaT=int(kw["deltaT"]), beta1=float(kw["beta1"]),
                           beta2=float(kw["beta2"]), orth_reg_weight=float(kw["orth_reg_weight"]), lora_dropout=0.0)
  pm = peft.get_peft_model(model, cfg)
  layers = {m: getattr(pm.base_model.model, m) for m in MODULES}

  def load(prefix):
    with torch.no_grad():
      for m, layer in layers.items():
        for f in "AEB":
          v = t(f"{prefix}{m}__{f}")
          getattr(layer, f"lora_{f}")["default"].copy_(v[:, None] if f == "E" else v)

  res = {}
  load("")
  with torch.no_grad():
    o = pm.base_model(x)           # AdaLoraModel.forward: adds the penalty to .loss
    res["y"] = o.logits.numpy()
    res["orth"] = o.loss.numpy()

  # The rank allocator after a sequence of steps with given parameters and gradients.
  pm.train()
  for step in range(int(kw["steps"])):
    load(f"t{step}__")
    for m, layer in layers.items():
      for f in "AEB":
        p = getattr(layer, f"lora_{f}")["default"]
        g = t(f"t{step}__{m}__g{f}")
        p.grad = g[:, None] if f == "E" else g
    pm.base_model.update_and_allocate(step)
    for m, layer in layers.items():
      res[f"t{step}__{m}__E"] = layer.lora_E["default"].detach()[:, 0].numpy().copy()
    res[f"t{step}__budget"] = np.asarray(pm.base_model.rankallocator.budget_schedule(step)[0])

  load("")
  pm.eval()
  with torch.no_grad():
    for layer in layers.values():
      layer.merge()
    res["y_merged"] = model(x).logits.numpy()
    for m, layer in layers.items():
      res[f"{m}__merged"] = layer.get_base_layer().weight.detach().numpy().copy()
  save(out, **res)


if __name__ == "__main__":
  main()
