"""PEFT's LoRA+ and LoRA-FA optimizers on a two-module model (runs inside .venv-ref).

    peft_optimizers.py IN.npz OUT.npz --lr=... --ratio=... --lr_embedding=... --weight_decay=... --steps=N

LoRA+: an Embedding (`emb`) and a Linear (`proj`, LoRA, its bias trained with bias="lora_only") with random adapter weights;
`create_loraplus_optimizer(model, torch.optim.AdamW, ...)` takes one step on seeded random gradients.
OUT: `plus_{name}_{w0,g,w1}` for name in emb_A, emb_B, proj_A, proj_B, proj_bias, in torch layout.

LoRA-FA: a Linear (`proj`) with a random LoRA (r=2, lora_alpha=4); `create_lorafa_optimizer` takes `steps`
steps on seeded random gradients of lora_B (A is frozen), with bf16 autocast off (float32 throughout).
OUT: `fa_A` [r, in], `fa_B0` [out, r], `fa_g{t}` [out, r] (t = 0..steps-1), `fa_B` [out, r] after the steps.
"""
import numpy as np
import peft
import peft.optimizers.lorafa as lorafa_mod
import torch
from _common import parse_args, save


def _loraplus(kw):
  torch.manual_seed(0)
  model = torch.nn.Module()
  model.emb = torch.nn.Embedding(10, 6)
  model.proj = torch.nn.Linear(6, 5, bias=True)
  model.forward = lambda x: model.proj(model.emb(x))
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "proj"], init_lora_weights=False,
                        bias="lora_only")   # proj's own bias trains: a vector leaf (group B, no decay)
  pm = peft.get_peft_model(model, cfg)
  opt = peft.optimizers.create_loraplus_optimizer(
      pm, torch.optim.AdamW, lr=float(kw["lr"]), loraplus_lr_ratio=float(kw["ratio"]),
      loraplus_lr_embedding=float(kw["lr_embedding"]), loraplus_weight_decay=float(kw["weight_decay"]))
  names = {"emb.lora_embedding_A.default": "emb_A", "emb.lora_embedding_B.default": "emb_B",
           "proj.lora_A.default.weight": "proj_A", "proj.lora_B.default.weight": "proj_B",
           "proj.base_layer.bias": "proj_bias"}
  out, params = {}, {}
  gen = torch.Generator().manual_seed(1)
  for n, p in pm.named_parameters():
    if not p.requires_grad:
      continue
    key = next(v for k, v in names.items() if n.endswith(k))
    with torch.no_grad():
      p.add_(torch.randn(p.shape, generator=gen))
    p.grad = torch.randn(p.shape, generator=gen)
    out[f"plus_{key}_w0"] = p.detach().numpy().copy()
    out[f"plus_{key}_g"] = p.grad.numpy().copy()
    params[key] = p
  assert len(params) == len(names), sorted(params)
  opt.step()
  for key, p in params.items():
    out[f"plus_{key}_w1"] = p.detach().numpy().copy()
  return out


def _lorafa(kw):
  lorafa_mod.is_bf16_available = lambda: False    # float32 projection (PEFT autocasts to bf16 when it can)
  torch.manual_seed(0)
  model = torch.nn.Sequential()
  model.add_module("proj", torch.nn.Linear(6, 5, bias=False))
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)
  pm = peft.get_peft_model(model, cfg)
  opt = peft.optimizers.create_lorafa_optimizer(pm, r=2, lora_alpha=4, lr=float(kw["lr"]),
                                                weight_decay=float(kw["weight_decay"]))
  layer = pm.base_model.model.proj
  a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
  out = {"fa_A": a.detach().numpy().copy(), "fa_B0": b.detach().numpy().copy()}
  gen = torch.Generator().manual_seed(2)
  for t in range(int(kw["steps"])):
    b.grad = torch.randn(b.shape, generator=gen)
    out[f"fa_g{t}"] = b.grad.numpy().copy()
    opt.step()
  out["fa_B"] = b.detach().numpy().copy()
  out["fa_A_after"] = a.detach().numpy().copy()
  return out


def main():
  _, out, kw = parse_args()
  save(out, **_loraplus(kw), **_lorafa(kw))


if __name__ == "__main__":
  main()
