r"""Preference tuning on the built-in preference task (chosen = the correct answer, rejected = a corruption),
with LoRA on a model first trained by SFT. Any pairwise loss of the registry: DPO and TRL's loss_type list,
SimPO, CPO, ORPO; KTO / BCO with `kind=unpaired`.

    python main.py --config=configs/sft.py:steps=400 --workdir=/tmp/sft
    python main.py --config=configs/dpo.py --config.model.init_workdir=/tmp/sft --workdir=/tmp/dpo
    python main.py --config=configs/dpo.py:loss_type=ipo --config.model.init_workdir=/tmp/sft --workdir=/tmp/ipo
    python main.py --config=configs/dpo.py:loss=kto,kind=unpaired --config.model.init_workdir=/tmp/sft ...

Held-out `eval/rewards/accuracies` and `eval/ranking_accuracy` (log-prob of the correct answer above the
corruption's) rise; exact match of greedy generations rises with them (README table).
"""
import ml_collections

from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", loss="dpo", loss_type="sigmoid", kind="pairwise",
                  adapter="lora", steps=300, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task}" + (",smoke" if arg.smoke else ""))
  c.data.pref_kind = arg.kind
  c.batch_size = 32 if not arg.smoke else 8
  c.total_steps = arg.steps if not arg.smoke else 8
  c.optim.learning_rate = 1e-3           # LoRA; use ~1e-5 for full fine-tuning
  c.optim.warmup_steps = 20 if not arg.smoke else 2
  c.loss = ml_collections.ConfigDict({"aux_weights": c.loss.aux_weights})   # aux terms: configs/common.py
  c.loss.name = arg.loss                 # dpo | simpo | cpo | orpo | kto | bco
  if arg.loss == "dpo":
    c.loss.loss_type = (arg.loss_type,)  # TRL loss_type list: sigmoid, ipo, hinge, robust, apo_zero, ...
    c.loss.loss_weights = (1.0,)         # with several types, e.g. RPO = ("sigmoid", "sft"), (1.0, alpha)
  elif arg.loss in ("kto", "cpo"):
    c.loss.loss_type = {"kto": "kto", "cpo": "sigmoid"}[arg.loss] if arg.loss_type == "sigmoid" else arg.loss_type
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0
  c.loss.f_divergence_type = "reverse_kl"   # reverse_kl | forward_kl | js_divergence | alpha_divergence
  if arg.adapter != "none":
    c.peft.method = arg.adapter
    c.peft.targets = "all-linear"
    c.peft.rank = 16
    c.peft.alpha = 32.0
  return c
