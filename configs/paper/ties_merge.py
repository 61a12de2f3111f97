r"""TIES-Merging of LLaMA2-7B fine-tunes (the `merge` task, configs/merge.py).

    python main.py --config=configs/paper/ties_merge.py --config.base=LLAMA2_7B \
        --config.models=FT_MATH,FT_CODE --workdir=OUT
    python main.py --config=configs/paper/ties_merge.py --workdir=OUT --config.dry_run=True

Yadav et al., *TIES-Merging: Resolving Interference When Merging Models* (NeurIPS 2023). Its main tables
merge T5 and (IA)3 checkpoints; its LLM merges (LLaMA fine-tunes) and their numbers are unverified here:
number "n/a (unverified)". Settings: top-k 20% per task vector (density 0.2), sign election by summed
mass, disjoint mean, lambda 1.0 (the paper's value without a validation set; its README sweeps 0.8-2.5),
equal weights, float32 compute, bfloat16 output. The inputs are HF directories (or workdirs) of fine-tunes
of the same base; the dry run checks the method and the shapes on the preset (no weight is read) and
reports the memory of a whole-tree and of a streaming merge.
"""
import json

from configs import merge as merge_base
from configs.common import parse_arg
from configs.paper import _recipe


def get_config(arg=None):
  arg = parse_arg(arg, density=0.2, lam=1.0, num_models=2)
  c = merge_base.get_config()
  c.dry_run = False
  c.method = "ties"
  c.params = json.dumps({"density": arg.density, "lambda_": arg.lam})
  c.dtype = "bfloat16"
  c.model_type = "llama"
  c.model_preset = "llama2_7b"            # the shape the dry run checks (the inputs' own config.json otherwise)
  c.num_models = arg.num_models
  return _recipe.card(
      c, name="ties_merge", paper="TIES-Merging (Yadav et al., NeurIPS 2023)", table="LLM merges",
      row=f"LLaMA2-7B, {arg.num_models} fine-tunes", metric="per-task accuracy of the merged model",
      number="n/a (unverified)", data_file="none (HF checkpoints)", record_format="HF directories",
      evaluation="configs/eval.py on each task's files",
      command="python main.py --config=configs/paper/ties_merge.py --config.base=BASE --config.models=A,B "
              "--workdir=OUT",
      follows="the paper's k=20%, lambda=1 (mergekit's sign rule for ties)")
