r"""LoRA-family SFT on a built-in task, starting from a model trained on another task.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/lora.py --config.model.init_workdir=/tmp/base --workdir=/tmp/lora
    python main.py --config=configs/lora.py:adapter=none --config.model.init_workdir=/tmp/base \
        --workdir=/tmp/full                                                              # full fine-tuning
    python main.py --config=configs/lora.py:adapter=dora,init=pissa,quantize=nf4 \
        --config.model.init_workdir=/tmp/base --workdir=/tmp/qdora
    python main.py --config=configs/lora.py:adapter=ia3 --config.peft.targets=k_proj,v_proj,down_proj \
        --config.model.init_workdir=/tmp/base --workdir=/tmp/ia3
    python main.py --config=configs/lora.py:model=tiny,smoke --workdir=/tmp/lora_smoke     # seconds, random base

The base learns `sort`; the adapter teaches it `reverse`. Compare the held-out exact match before and after
(summary.json of each workdir) with the full fine-tuning run: the target is a LoRA gain of at least 90% of
the full fine-tuning gain, with a fraction of the trainable parameters (the log prints both counts). Only the
adapter tensors (and their optimizer state) are checkpointed.
"""
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", adapter="lora", init="default", rank=16, alpha=32.0,
                  quantize="", steps=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  c.optim.learning_rate = 3e-3 if arg.adapter != "none" else 1e-3   # LoRA takes a larger step than full FT
  if arg.adapter != "none":
    c.peft.method = arg.adapter          # lora | dora | ia3 (peft.adapter_names())
    c.peft.init = arg.init               # default | gaussian | pissa | pissa_niter_<k> | olora
    c.peft.rank = arg.rank
    c.peft.alpha = arg.alpha             # s = alpha / rank
    c.peft.targets = "all-linear"        # or --config.peft.targets=q_proj,v_proj (HF names) or a path regex
    c.peft.quantize = arg.quantize or None   # nf4 | int8 storage of the frozen base (QLoRA)
  if arg.smoke:
    c.peft.rank = min(c.peft.rank, 4)
  return c
