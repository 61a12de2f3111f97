r"""Merges models into one Hugging Face directory (the `merge` task, train_lib/merge.py).

    # TIES of two fine-tunes (HF directories, workdirs of runs, or HF PEFT adapter directories) on a base:
    python main.py --config=configs/merge.py --config.method=ties --config.models=DIR1,DIR2 \
        --config.base=DIR0 --config.params='{"density": 0.5, "weight": [1.0, 0.5]}' --workdir=OUT
    # per-tensor parameters: regexes over our parameter paths, first full match wins
    python main.py --config=configs/merge.py --config.method=dare_ties --config.models=DIR1,DIR2 \
        --config.base=DIR0 --config.params='{"density": {"layers/attn/.*": 0.7, ".*": 0.3}}' --workdir=OUT
    # a uniform soup (no base), two LoRA adapters combined natively (exact rank concatenation)
    python main.py --config=configs/merge.py --config.method=linear --config.models=RUN1,RUN2 --workdir=OUT
    python main.py --config=configs/merge.py --config.method=lora_cat --config.models=AD1,AD2 \
        --config.base=DIR0 --workdir=OUT
    # a mergekit YAML (merge_method, base_model, models[].parameters, parameters with filters, dtype)
    python main.py --config=configs/merge.py --config.mergekit_yaml=merge.yml --workdir=OUT
    # models of different vocabulary sizes: keep the common leading rows (mergekit's rectify_embed)
    python main.py --config=configs/merge.py --config.method=linear --config.models=A,B \
        --config.rectify_embed=True --workdir=OUT

    # Fisher merging: each model's diagonal Fisher (labels sampled from the model) on calibration data
    python main.py --config=configs/merge.py --config.method=fisher --config.models=RUN1,RUN2 \
        --config.data.source=jsonl --config.data.path=calib.jsonl --config.calibration.num_batches=16 --workdir=OUT

OUT receives config.json, safetensors, the base's tokenizer files and merge.json (what was merged, how).
`merging.names()` lists the methods; merging/README.md their parameters and defaults.
"""
import ml_collections

import data


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "merge"
  c.method = "ties"           # a merging.names() entry
  c.models = ""               # comma-separated: HF directories, training workdirs, HF PEFT adapter directories
  c.base = ""                 # the base model (HF directory or workdir); "" for methods without one
  c.params = ""               # JSON: {"density": 0.5, "weight": [1, 0.5], "lambda": 1.0, ...}
  c.mergekit_yaml = ""        # a mergekit config; replaces method, models, base and params
  c.seed = 0                  # randomness of DARE / DELLA masks
  c.dtype = ""                # output dtype ("" keeps the base's), e.g. bfloat16
  c.model_type = ""           # config.json dialect (llama | mistral | qwen2 | gemma); "" = the base's or llama
  c.rectify_embed = False     # different vocabulary sizes: keep the first min(V) rows instead of refusing
  c.streaming = True          # stream tensor by tensor when every input is an HF directory and the method allows
  # Per-model tensors a method estimates from data (Fisher merging's diagonal Fisher): batches of `data`
  # (any data option; its tokenizer, else the models'), the same batches for every model.
  c.data = data.default_config()
  c.data.task = "sort"
  c.calibration = ml_collections.ConfigDict(dict(num_batches=8, batch_size=4, seq_len=128))
  return c
