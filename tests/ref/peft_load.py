"""Loads transformers checkpoints, optionally with an HF `peft` adapter directory on top, and returns logits
(runs in .venv-ref).

    peft_load.py IN.npz OUT.npz --jobs=JSON

IN: tokens [B, T] int. jobs: a JSON list of {"base": model dir, "adapter": adapter dir or null}. OUT:
`logits_<k>` [B, T, V] float32 of job k (adapter active, unmerged) and, with an adapter, `merged_<k>` after
`merge_and_unload()`. Fails when transformers reports a missing or unexpected tensor, or when the adapter
file's tensors and the adapter that `PeftModel.from_pretrained` built differ in names or values (PEFT only
warns about those, and would otherwise run freshly initialised adapter weights).
"""
import json

import peft
import torch
import transformers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from _common import parse_args, save


def main():
  arrays, out, kw = parse_args()
  tokens = torch.as_tensor(arrays["tokens"]).long()
  results = {}
  for k, job in enumerate(json.loads(kw["jobs"])):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        job["base"], dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {key: v for key, v in info.items() if v}
    if bad:
      raise SystemExit(f"{job['base']}: transformers did not load every tensor: {bad}")
    if job.get("adapter"):
      model = peft.PeftModel.from_pretrained(model, job["adapter"])
      saved = load_file(f"{job['adapter']}/adapter_model.safetensors")
      built = get_peft_model_state_dict(model, save_embedding_layers=False)
      if set(saved) != set(built):
        raise SystemExit(f"adapter keys differ: file only {sorted(set(saved) - set(built))[:5]}, "
                         f"model only {sorted(set(built) - set(saved))[:5]}")
      for name, x in saved.items():
        if not torch.equal(x.float(), built[name].float().cpu()):
          raise SystemExit(f"{name}: the loaded adapter does not hold the file's values")
    model = model.eval()
    with torch.no_grad():
      results[f"logits_{k}"] = model(tokens).logits.float().numpy()
      if job.get("adapter"):
        results[f"merged_{k}"] = model.merge_and_unload()(tokens).logits.float().numpy()
  save(out, **results)


if __name__ == "__main__":
  main()
