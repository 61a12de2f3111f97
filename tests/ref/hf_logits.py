"""Loads Hugging Face checkpoints with `AutoModelForCausalLM.from_pretrained` and returns their logits
(runs in .venv-ref).

    hf_logits.py IN.npz OUT.npz --dirs=DIR1,DIR2,...

IN: tokens [B, T] int. OUT: `logits_<k>` [B, T, V] float32 for the k-th directory, run in float32 with
eager attention. Fails when transformers reports a missing, unexpected or mismatched tensor, because it
would otherwise initialise that tensor at random.
"""
import torch
import transformers

from _common import parse_args, save


def main():
  arrays, out, kw = parse_args()
  tokens = torch.as_tensor(arrays["tokens"]).long()
  results = {}
  for k, path in enumerate(kw["dirs"].split(",")):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {key: v for key, v in info.items() if v and key != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if bad:
      raise SystemExit(f"{path}: transformers did not load every tensor: {bad}")
    with torch.no_grad():
      results[f"logits_{k}"] = model.eval()(tokens).logits.float().numpy()
    results[f"class_{k}"] = type(model).__name__
  save(out, **results)


if __name__ == "__main__":
  main()
