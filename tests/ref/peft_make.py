"""Puts HF `peft` adapters on a saved tiny transformers model, perturbs them, saves them and returns logits
(runs in .venv-ref).

    peft_make.py IN.npz OUT.npz --root=DIR --cases=JSON

IN: tokens [B, T] int. cases: a JSON list of {"name", "base" (a model directory), "peft_type" ("LORA" or
"IA3"), "r", "alpha", "targets", "use_rslora", "use_dora", "lora_bias", "init" (true | "gaussian" | "pissa" |
"olora"), "feedforward" (IA3), "seed"}. For each case, with the case's seed:

  1. get_peft_model(base, config) runs PEFT's initialisation; OUT gets `<name>__init__<key>` for every
     adapter tensor (state-dict keys as save_pretrained writes them) and `<name>__base__<module>` for the
     weight of every adapted module's base layer after the init (the residual for PiSSA/OLoRA);
  2. every adapter tensor is moved away from its init (B no longer zero, magnitudes off the norm), then
     `save_pretrained(ROOT/<name>)`;
  3. OUT gets `<name>__logits` (adapters active, unmerged) and `<name>__merged` (after merge_and_unload).
"""
import json

import peft
import torch
import transformers
from peft.utils import get_peft_model_state_dict

from _common import parse_args, save


def config_of(case):
  if case["peft_type"] == "IA3":
    return peft.IA3Config(task_type="CAUSAL_LM", target_modules=case["targets"],
                          feedforward_modules=case.get("feedforward", []))
  return peft.LoraConfig(task_type="CAUSAL_LM", r=case["r"], lora_alpha=case["alpha"],
                         target_modules=case["targets"], lora_dropout=0.0, use_rslora=case.get("use_rslora", False),
                         use_dora=case.get("use_dora", False), lora_bias=case.get("lora_bias", False),
                         init_lora_weights=case.get("init", True))


def main():
  arrays, out, kw = parse_args()
  tokens = torch.as_tensor(arrays["tokens"]).long()
  results = {}
  for case in json.loads(kw["cases"]):
    name = case["name"]
    base = transformers.AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32,
                                                            attn_implementation="eager")
    torch.manual_seed(case.get("seed", 0))
    model = peft.get_peft_model(base, config_of(case)).eval()
    for key, x in get_peft_model_state_dict(model).items():
      results[f"{name}__init__{key}"] = x.detach().float().clone().numpy()
    for mod_name, mod in model.named_modules():
      if hasattr(mod, "base_layer") and isinstance(mod.base_layer, torch.nn.Linear):
        results[f"{name}__base__{mod_name}"] = mod.base_layer.weight.detach().float().clone().numpy()
    gen = torch.Generator().manual_seed(1000 + case.get("seed", 0))
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if not p.requires_grad:
          continue
        noise = torch.randn(p.shape, generator=gen)
        if "lora_magnitude_vector" in pname or "ia3_l" in pname:
          p.mul_(1.0 + 0.2 * noise)
        else:
          p.add_(0.1 * noise)
    model.save_pretrained(f"{kw['root']}/{name}")
    with torch.no_grad():
      results[f"{name}__logits"] = model(tokens).logits.float().numpy()
      results[f"{name}__merged"] = model.merge_and_unload()(tokens).logits.float().numpy()
  save(out, **results)


if __name__ == "__main__":
  main()
