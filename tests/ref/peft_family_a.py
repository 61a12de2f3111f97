"""HF `peft` side of tests/test_adapters_family_a.py: VeRA, HRA and MiSS, in one call (runs in .venv-ref).

    peft_family_a.py IN.npz OUT.npz --root=DIR --layers=JSON --loads=JSON --makes=JSON

1. layers: [{"name", "peft_type", "config" (kwargs of the PEFT config), "dims" [d0, d1, ...]}]. A chain of
   nn.Linear l0: d0 -> d1, l1: d1 -> d2, ... (weights `<name>__w<i>` [out, in], biases `<name>__b<i>` from IN)
   gets the adapter on every layer; its tensors are set from IN `<name>__t__<state-dict key without the
   adapter name>` (e.g. `l0.vera_lambda_d`, `vera_A`). OUT: `<name>__y` = chain(`<name>__x`) unmerged and
   `<name>__ym` after merge_and_unload.
2. loads: [{"name", "base", "adapter"}]: PeftModel.from_pretrained(base, adapter); fails unless the model
   holds every tensor of the file with its value. OUT: `<name>__logits`, `<name>__merged` on IN `tokens`.
3. makes: [{"name", "base", "peft_type", "config", "seed"}]: get_peft_model, every trainable tensor moved off
   its init by seeded noise, save_pretrained(ROOT/<name>). OUT: `<name>__logits`, `<name>__merged`.
"""
import json
import re

import peft
import torch
import transformers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from _common import parse_args, save

CONFIGS = {"VERA": peft.VeraConfig, "HRA": peft.HRAConfig, "MISS": peft.MissConfig}


class Chain(torch.nn.Module):
  def __init__(self, dims):
    super().__init__()
    for i in range(len(dims) - 1):
      setattr(self, f"l{i}", torch.nn.Linear(dims[i], dims[i + 1]))
    self.n = len(dims) - 1

  def forward(self, x):
    for i in range(self.n):
      x = getattr(self, f"l{i}")(x)
    return x


def layer_case(case, arrays):
  name = case["name"]
  model = Chain(case["dims"])
  with torch.no_grad():
    for i in range(model.n):
      getattr(model, f"l{i}").weight.copy_(torch.as_tensor(arrays[f"{name}__w{i}"]))
      getattr(model, f"l{i}").bias.copy_(torch.as_tensor(arrays[f"{name}__b{i}"]))
  config = CONFIGS[case["peft_type"]](target_modules=[f"l{i}" for i in range(model.n)], **case["config"])
  model = peft.get_peft_model(model, config).eval()
  given = {k.split("__t__", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}__t__")}
  seen = set()
  with torch.no_grad():
    for key, t in list(model.state_dict(keep_vars=True).items()):
      short = key.replace("base_model.model.", "").replace("base_model.", "").replace(".default", "")
      short = re.sub(r"^l\d+\.((?:vera|randlora)_[AB])$", r"\1", short)   # each layer's view of the shared basis
      if "base_layer" in short:
        continue
      if short not in given:
        raise SystemExit(f"{name}: no value given for {key} ({short}); given {sorted(given)}")
      value = torch.as_tensor(given[short])
      if value.shape != t.shape:
        raise SystemExit(f"{name}: {key} is {tuple(t.shape)} in PEFT, given {tuple(value.shape)}")
      t.copy_(value)
      if not torch.equal(t.float(), value):     # e.g. RandLoRA's bfloat16 basis buffers
        raise SystemExit(f"{name}: {key} ({t.dtype}) cannot hold the given values exactly")
      seen.add(short)
  if seen != set(given):
    raise SystemExit(f"{name}: values given for tensors PEFT does not have: {sorted(set(given) - seen)}")
  x = torch.as_tensor(arrays[f"{name}__x"])
  with torch.no_grad():
    y = model(x)
    ym = model.merge_and_unload()(x)
  return {f"{name}__y": y.numpy(), f"{name}__ym": ym.numpy()}


def base_model(path):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  bad = {k: v for k, v in info.items() if v}
  if bad:
    raise SystemExit(f"{path}: transformers did not load every tensor: {bad}")
  return model


def logits(model, tokens):
  model = model.eval()
  with torch.no_grad():
    return model(tokens).logits.numpy(), model.merge_and_unload()(tokens).logits.numpy()


def load_case(case, tokens):
  model = peft.PeftModel.from_pretrained(base_model(case["base"]), case["adapter"])
  saved = load_file(f"{case['adapter']}/adapter_model.safetensors")
  built = get_peft_model_state_dict(model, save_embedding_layers=False)
  if set(saved) != set(built):
    raise SystemExit(f"{case['name']}: adapter keys differ: file only {sorted(set(saved) - set(built))[:5]}, "
                     f"model only {sorted(set(built) - set(saved))[:5]}")
  for key, x in saved.items():
    if not torch.equal(x, built[key].cpu()):
      raise SystemExit(f"{case['name']}: {key}: the loaded adapter does not hold the file's values")
  y, ym = logits(model, tokens)
  return {f"{case['name']}__logits": y, f"{case['name']}__merged": ym}


def make_case(case, tokens, root):
  torch.manual_seed(case["seed"])
  config = CONFIGS[case["peft_type"]](task_type="CAUSAL_LM", **case["config"])
  model = peft.get_peft_model(base_model(case["base"]), config)
  gen = torch.Generator().manual_seed(1000 + case["seed"])
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.requires_grad:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(f"{root}/{case['name']}")
  y, ym = logits(model, tokens)
  return {f"{case['name']}__logits": y, f"{case['name']}__merged": ym}


def main():
  arrays, out, kw = parse_args()
  results = {}
  for case in json.loads(kw["layers"]):
    results.update(layer_case(case, arrays))
  tokens = torch.as_tensor(arrays["tokens"]).long()
  for case in json.loads(kw["loads"]):
    results.update(load_case(case, tokens))
  for case in json.loads(kw["makes"]):
    results.update(make_case(case, tokens, kw["root"]))
  save(out, **results)


if __name__ == "__main__":
  main()
