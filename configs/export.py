r"""Exports a trained run as a Hugging Face checkpoint (and, for adapter runs, an HF PEFT adapter).

    python main.py --config=configs/export.py --config.train_workdir=/tmp/sft --workdir=/tmp/sft_export
    # -> /tmp/sft_export/hf (transformers.AutoModelForCausalLM.from_pretrained loads it), /tmp/sft_export/adapter
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "export"
  c.train_workdir = ""        # the workdir of the training run
  c.step = 0                  # 0: the latest checkpoint
  c.model_type = "llama"      # llama | mistral | qwen2 | gemma (config.json dialect to write)
  c.dtype = ""                # "" keeps each parameter's dtype; e.g. bfloat16
  return c
