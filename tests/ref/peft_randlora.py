"""HF `peft` side of tests/test_adapters_randlora.py (runs in .venv-ref), in one call.

    peft_randlora.py IN.npz OUT.npz --root=DIR --layers=JSON --loads=JSON --makes=JSON

Same cases as peft_family_a.py (layers: a chain of nn.Linear with its RandLoRA tensors set from IN
`<name>__t__<key>`, OUT `<name>__y` / `<name>__ym` unmerged / merged; loads: our export through
PeftModel.from_pretrained; makes: get_peft_model + seeded noise + save_pretrained), for PEFT's RandLoraConfig.
The basis buffers (`randlora_A` [r, 1, m], `randlora_B` [M, N, r]) are bfloat16 in PEFT: the values given
must be bfloat16-exact, which the script checks.
"""
import json
import re

import peft
import torch

import peft_family_a as family
from _common import parse_args, save

family.CONFIGS["RANDLORA"] = peft.RandLoraConfig


def layer_case(case, arrays):
  name = case["name"]
  model = family.Chain(case["dims"])
  with torch.no_grad():
    for i in range(model.n):
      getattr(model, f"l{i}").weight.copy_(torch.as_tensor(arrays[f"{name}__w{i}"]))
      getattr(model, f"l{i}").bias.copy_(torch.as_tensor(arrays[f"{name}__b{i}"]))
  config = peft.RandLoraConfig(target_modules=[f"l{i}" for i in range(model.n)], **case["config"])
  model = peft.get_peft_model(model, config).eval()
  given = {k.split("__t__", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}__t__")}
  seen = set()
  with torch.no_grad():
    for key, t in list(model.state_dict(keep_vars=True).items()):
      short = key.replace("base_model.model.", "").replace("base_model.", "").replace(".default", "")
      short = re.sub(r"^l\d+\.(randlora_[AB])$", r"\1", short)     # every layer's view of the shared basis
      if "base_layer" in short:
        continue
      if short not in given:
        raise SystemExit(f"{name}: no value given for {key} ({short}); given {sorted(given)}")
      value = torch.as_tensor(given[short])
      if value.shape != t.shape:
        raise SystemExit(f"{name}: {key} is {tuple(t.shape)} in PEFT, given {tuple(value.shape)}")
      t.copy_(value)
      if not torch.equal(t.float(), value):
        raise SystemExit(f"{name}: {key} ({t.dtype}) cannot hold the given values exactly")
      seen.add(short)
  if seen != set(given):
    raise SystemExit(f"{name}: values given for tensors PEFT does not have: {sorted(set(given) - seen)}")
  x = torch.as_tensor(arrays[f"{name}__x"])
  with torch.no_grad():
    y = model(x)
    ym = model.merge_and_unload()(x)
  return {f"{name}__y": y.numpy(), f"{name}__ym": ym.numpy()}


def main():
  arrays, out, kw = parse_args()
  results = {}
  for case in json.loads(kw["layers"]):
    results.update(layer_case(case, arrays))
  tokens = torch.as_tensor(arrays["tokens"]).long()
  for case in json.loads(kw["loads"]):
    results.update(family.load_case(case, tokens))
  for case in json.loads(kw["makes"]):
    results.update(family.make_case(case, tokens, kw["root"]))
  save(out, **results)


if __name__ == "__main__":
  main()
