"""Tokenizes records with TRL's own dataset preparation (runs in .venv-ref, trl 1.16).

    trl_data.py IN.npz OUT.npz

IN: `spec`, a JSON string {"runs": [{"dir": tokenizer directory, "cases": [{"trainer": "sft" | "dpo" | "kto",
"record": {...}, "completion_only_loss": optional bool, "assistant_only_loss": optional bool,
"chat_template": optional template replacing the tokenizer's}]}]}.
OUT: `result`, a JSON string: per run, per case, SFT {"input_ids", "labels"}, DPO {"prompt_ids", "chosen_ids",
"rejected_ids"}, KTO {"prompt_ids", "completion_ids"}, or {"error": message}.

`SFTTrainer._prepare_dataset` / `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset` run
unbound, on a stand-in for the trainer that holds what they read of it (`_tokenizer`; for SFT
`completion_only_loss` and `chat_template`, set as `SFTTrainer.__init__` sets them: completion-only for
prompt-completion data by default, no training template for a template with generation blocks; for KTO
no KL pairs, which rotate completions within a batch), so no model is built.
"""
import dataclasses
import json
import tempfile
import types

import datasets
import numpy as np
import transformers
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from _common import parse_args, save


def main():
  arrays, out, _ = parse_args()
  spec = json.loads(str(arrays["spec"]))
  with tempfile.TemporaryDirectory() as tmp:
    sft_args = SFTConfig(output_dir=tmp, max_length=None, report_to=[], use_cpu=True, bf16=False)
    dpo_args = DPOConfig(output_dir=tmp, max_length=None, report_to=[], use_cpu=True, bf16=False)
    kto_args = KTOConfig(output_dir=tmp, max_length=None, report_to=[], use_cpu=True, bf16=False)
    runs = [run(r["dir"], r["cases"], sft_args, dpo_args, kto_args) for r in spec["runs"]]
  save(out, result=np.array(json.dumps(runs)))


def run(tok_dir, cases, sft_args, dpo_args, kto_args):
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  results = []
  for case in cases:
    record = case["record"]
    dataset = datasets.Dataset.from_list([record])
    saved, tok.chat_template = tok.chat_template, case.get("chat_template") or tok.chat_template
    try:
      if case["trainer"] == "sft":
        only = case.get("completion_only_loss")
        if only is None:
          only = "prompt" in record and "completion" in record
        fake = types.SimpleNamespace(_tokenizer=tok, completion_only_loss=only, chat_template=None)
        args = sft_args
        if case.get("assistant_only_loss"):   # a template with {% generation %} markers: no training template
          args = dataclasses.replace(sft_args, assistant_only_loss=True)
        ds = SFTTrainer._prepare_dataset(fake, dataset, tok, args, packing=False, formatting_func=None,
                                         dataset_name="train")
        row = ds[0]
        results.append({"input_ids": list(row["input_ids"]), "labels": list(row["labels"])})
      elif case["trainer"] == "kto":
        fake = types.SimpleNamespace(_tokenizer=tok, calculate_KL=False, desirable_weight=kto_args.desirable_weight,
                                     undesirable_weight=kto_args.undesirable_weight)
        ds = KTOTrainer._prepare_dataset(fake, dataset, tok, kto_args, dataset_name="train")
        row = ds[0]
        results.append({k: list(row[k]) for k in ("prompt_ids", "completion_ids")})
      else:
        fake = types.SimpleNamespace(_tokenizer=tok)
        ds = DPOTrainer._prepare_dataset(fake, dataset, tok, dpo_args, dataset_name="train")
        row = ds[0]
        results.append({k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    except Exception as e:  # pylint: disable=broad-except
      results.append({"error": f"{type(e).__name__}: {e}"})
    finally:
      tok.chat_template = saved
  return results


if __name__ == "__main__":
  main()
