r"""Writes a model's log-probs of every record's completions into the records (train_lib/precompute.py), so
DPO-family losses train with a precomputed reference and PoFT with its aligned models' log-probs.

    # DPO's reference: {"prompt", "chosen", "rejected"} records get "ref_logps": [chosen, rejected]
    python main.py --config=configs/precompute.py --config.reference=/tmp/sft --config.data.pref_kind=pairwise \
      --config.data.source=jsonl --config.data.path='data/{split}.jsonl' --config.data.tokenizer=DIR \
      --workdir=/tmp/pairs_ref
    python main.py --config=configs/dpo.py --config.model.init_workdir=/tmp/sft --config.data.source=jsonl \
      --config.data.path='/tmp/pairs_ref/{split}.jsonl' --config.data.ref_logps_field=ref_logps \
      --config.data.tokenizer=DIR --workdir=/tmp/dpo
    # PoFT: SFT records get "aligned_logps": [...], one entry per run (append=True from the second model on)
    python main.py --config=configs/precompute.py --config.reference=ALIGNED_HF_DIR \
      --config.data.source=jsonl --config.data.path='sft_{split}.jsonl' --config.data.tokenizer=DIR --workdir=/tmp/a1
    python main.py --config=configs/sft.py --config.loss.name=poft --config.data.source=jsonl \
      --config.data.path='/tmp/a1/{split}.jsonl' --config.data.aligned_logps_field=aligned_logps \
      --config.data.packing=none --config.data.tokenizer=DIR --workdir=/tmp/poft

Use the same data options and seq_len as the training run: the numbers hold for that tokenization.
"""
import ml_collections

import data


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "precompute"
  c.reference = ""            # a project workdir (latest checkpoint) or a Hugging Face checkpoint directory
  c.data = data.default_config()   # every data option: read the records as the training run will
  c.seq_len = 256
  c.batch_size = 16
  c.splits = "train,test"
  c.field = ""                # "": ref_logps for preference records, aligned_logps for SFT records
  c.append = False            # SFT: add this model's number to the list already in `field` (PoFT's M models)
  return c
