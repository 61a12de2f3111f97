r"""Full-parameter SFT with a projected optimizer (GaLore, Fira or FRUGAL) on a built-in task.

    python main.py --config=configs/galore.py --workdir=/tmp/galore
    python main.py --config=configs/galore.py:opt=fira --workdir=/tmp/fira
    python main.py --config=configs/galore.py:opt=frugal,model=tiny,smoke --workdir=/tmp/frugal_smoke

GaLore keeps the Adam moments of the attention/MLP kernels in a rank-`rank` projection refreshed by SVD
every `update_proj_gap` steps (Zhao et al., 2024); everything else gets plain AdamW.
"""
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", opt="galore", rank=32, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task}" + (",smoke" if arg.smoke else ""))
  c.optim.name = arg.opt
  projected = r"layers/(attn|mlp)/.*_proj/kernel"  # which kernels are projected (the rest: plain Adam)
  if arg.opt in ("galore", "fira"):
    o = c.optim[arg.opt]
    o.rank = arg.rank                              # projection rank
    o.update_proj_gap = 200                        # steps between SVD refreshes of the projector
    o.scale = 1.0 if arg.opt == "galore" else 0.25   # Fira's README recipe: alpha 0.25
    o.proj_type = "std"                            # std | reverse_std | left | right | full
    o.projected = projected
  else:
    o = c.optim.frugal
    o.density = 0.25                               # state-full fraction
    o.update_gap = 200                             # steps between subspace refreshes
    o.subspace = "svd"                             # GaLore's SVD subspace (the `--optimizer frugal` default
                                                   # is whole-tensor blocks)
    o.inactive_lr_scale = 0.1                      # the paper's fine-tuning value (1.0 for pre-training)
    o.projected = projected
  return c
