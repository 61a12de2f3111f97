"""Loads an exported checkpoint the way a user would, with nothing but its directory (runs in .venv-ref).

    hf_export_check.py IN.npz OUT.npz --dir=DIR --spec=JSON

spec: {"texts": [...], "prompt": text, "max_new_tokens": N, "chat": optional messages}.
OUT: `result`, a JSON string: `encoded` (AutoTokenizer's `encode(text)`, special tokens as it adds them),
`decoded` (of those ids, special tokens skipped), `prompt_ids`, `generated` (the new token ids of greedy
`model.generate(prompt_ids)` with the directory's generation_config, eos/pad from it), `eos_token_id` of
the generation config, and `chat_text` (the tokenizer's chat template on `chat`, with the generation prompt).
"""
import json

import numpy as np
import torch
import transformers

from _common import parse_args, save


def main():
  _, out, kw = parse_args()
  spec = json.loads(kw["spec"])
  tok = transformers.AutoTokenizer.from_pretrained(kw["dir"])
  model = transformers.AutoModelForCausalLM.from_pretrained(kw["dir"], dtype=torch.float32).eval()
  res = {"encoded": [tok.encode(t) for t in spec["texts"]]}
  res["decoded"] = [tok.decode(ids, skip_special_tokens=True) for ids in res["encoded"]]
  prompt_ids = tok.encode(spec["prompt"])
  res["prompt_ids"] = prompt_ids
  with torch.no_grad():
    gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=spec["max_new_tokens"], do_sample=False)
  res["generated"] = gen[0, len(prompt_ids):].tolist()
  res["eos_token_id"] = model.generation_config.eos_token_id
  if spec.get("chat"):
    res["chat_text"] = tok.apply_chat_template(spec["chat"], tokenize=False, add_generation_prompt=True)
  save(out, result=np.array(json.dumps(res)))


if __name__ == "__main__":
  main()
