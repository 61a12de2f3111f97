r"""OwLore (OWS): blocks drawn in proportion to their outlier ratio, GaLore inside the sampled blocks.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/owlore.py --config.model.init_workdir=/tmp/base --workdir=/tmp/owlore
    python main.py --config=configs/owlore.py:method=owlore_alpha --config.model.init_workdir=/tmp/base \
        --workdir=/tmp/owlore_alpha                                       # p ∝ 1/alpha: no calibration data
    python main.py --config=configs/owlore.py:model=tiny,smoke --workdir=/tmp/owlore_smoke  # seconds

Li et al., *OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM
Fine-tuning* (arXiv 2405.18380; v3 renamed OWS), `owlore_scripts/run_owlore_low_rank.sh`: gamma 5 of 32 blocks,
K = 50, GaLore rank 256 with update_proj_gap 100 and scale 1 on every attention/MLP kernel of the sampled
blocks, Adam eps 1e-6, no weight decay, lr 3e-4 (we keep the SFT demo's rate; use 3e-4 on a pre-trained LLM).
The outlier ratios D_l are computed once on the starting weights (`diagnostics.outlier_ratios`, with
`calibration_batches` training batches instead of OWL's 128 C4 sequences) and p_l = D_l / sum D.
"""
import ml_collections

import models
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", method="owlore", gamma=0, rank=256, steps=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  depth = models.preset(arg.model).num_layers
  c.sampling = ml_collections.ConfigDict(dict(
      method=arg.method,         # owlore (p from outlier ratios) | owlore_alpha (p ∝ 1/alpha, HT-SR)
      # gamma=0: OwLore's 5 blocks (of Llama-2-7B's 32), at most half the depth of a smaller preset. The
      # depth comes from `model`: with --config.model.hf_path, pass the matching preset or gamma itself.
      gamma=arg.gamma or min(5, max(1, depth // 2)),
      interval_steps=50,         # K
      prob_mode="owl",           # owl (p ∝ score) | owl_reverse | uniform | increase | decrease
      # M of the outlier ratio. OWL's LLaMA README uses 5 (its argparse default is 3); OwLore's cached
      # vector is named `..._ratio_13.txt`, which suggests 13 (unverified).
      outlier_M=5.0,
      calibration_batches=2,     # training batches for the activation statistics (128 rows at batch 64)
      eigs_thresh=50,            # owlore_alpha: kernels with fewer eigenvalues stay out of the block alphas
  ))
  # GaLore on the slots' attention/MLP kernels (their norm scales get its plain Adam); the rest gets AdamW.
  # The slots' optimizer is their own, so its state (projectors, moments, count) restarts with every draw.
  c.optim.rules = ((r"layers/.*/slots", "galore"), (".*", "adamw"))
  g = c.optim.galore
  g.projected = r"layers/(attn|mlp)/.*_proj/kernel/slots"
  g.rank = arg.rank                      # clipped per kernel to min(in, out)
  g.update_proj_gap = 100
  g.scale = 1.0
  g.proj_type = "std"
  g.eps = 1e-6
  g.weight_decay = 0.0
  if arg.smoke:
    c.sampling.gamma = arg.gamma or 1
    c.sampling.interval_steps = 4
    c.sampling.calibration_batches = 1
    c.sampling.eigs_thresh = 8
    g.rank = min(arg.rank, 8)
    g.update_proj_gap = 4
  return c
