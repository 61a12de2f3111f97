r"""SpIEL: sparse fine-tuning at a fixed density, with periodic prune and regrow of the trained entries.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=$BASE           # the base model
    python main.py --config=configs/spiel.py:density=0.05 --config.model.init_workdir=$BASE \
        --workdir=$WORKDIR
    python main.py --config=configs/spiel.py:regrow=momentum --config.model.init_workdir=$BASE \
        --workdir=$WORKDIR_MA                                                            # SpIEL-MA
    python main.py --config=configs/spiel.py:model=tiny,smoke --workdir=$WORKDIR         # seconds, random base

Ansell et al., *Scaling Sparse Fine-Tuning to Large Language Models* (2024), `AlanAnsell/peft` (tuners/sft):
every attention/MLP kernel trains k = density * in * out entries (`optim/_spiel.py`); every
`reselection_steps` steps the entries of smallest |delta| are replaced by those of largest accumulated
gradient (SpIEL-AG) or SM3 momentum estimate (SpIEL-MA). Biases, norms, embeddings and the head are frozen.
The options default to the reference's `SftConfig` (density 0.01, reselection every 20 steps after 5 steps
of accumulation, 20% replaced at first, decaying linearly).
"""
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", density=0.01, regrow="gradient", steps=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  c.optim.rules = ((r"layers/(attn|mlp)/.*_proj/kernel", "spiel"), (".*", None))
  o = c.optim.spiel
  o.density = arg.density                            # fraction of each kernel's entries that train
  o.regrow = arg.regrow                              # gradient (SpIEL-AG) | momentum (SpIEL-MA)
  o.total_steps = c.get_ref("total_steps")           # follows --config.total_steps: p decays to 0 at the end
  o.targets = r"layers/(attn|mlp)/.*_proj/kernel"
  if arg.smoke:
    o.reselection_steps = 4
    o.selection_accumulation_steps = 2
  return c
