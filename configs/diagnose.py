r"""HT-SR diagnostics of a checkpoint: power-law alpha of every weight matrix, tables and ESD plots.

    python main.py --config=configs/diagnose.py --config.checkpoint=/tmp/sft --workdir=/tmp/sft_htsr
    python main.py --config=configs/diagnose.py --config.checkpoint=path/to/hf_model --workdir=/tmp/htsr
    python main.py --config=configs/diagnose.py:preset=tempbalance --config.eigs_thresh=32 \
        --config.checkpoint=/tmp/sft --workdir=/tmp/sft_htsr_tb       # the alphas TempBalance schedules on
    python main.py --config=configs/diagnose.py --config.esd_type=cul --config.checkpoint=/tmp/sft \
        --workdir=/tmp/sft_cul                                         # W_t - W_0 of the run

Writes alphas.csv / alphas.json (one row per matrix and per layer slice, with the estimator config),
alpha_per_layer.png and esd_<layer>_<name>.png (see diagnostics/_task.py). The default estimator is
WeightWatcher's (goodness-of-fit xmin scan, zeros filtered, float64 SVD on the host); `preset=tempbalance`
or `model_balancing` gives the median-xmin alphas the layerwise learning rates use. Alphas from different
xmin rules are not comparable (METHODS.md A1).
"""
import ml_collections
from ml_collections import config_dict

from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, preset="weightwatcher")
  c = ml_collections.ConfigDict()
  c.task = "diagnose"
  c.checkpoint = ""                  # an HF model directory or a training workdir
  c.step = 0                         # training workdir: checkpoint step; 0 = the latest
  c.init_checkpoint = ""             # esd_type=cul: W_0 (HF dir or workdir); "" = a workdir's own start

  # The estimator: an EsdConfig preset, then the overrides below ("" / -1 / None keep the preset's value).
  c.esd_preset = arg.preset          # weightwatcher | tempbalance | model_balancing
  c.mode = ""                        # xmin rule: median | goodness_of_fit | fix_finger
  c.xmin_pos = 0.0                   # median: xmin at 1/xmin_pos of the spectrum (> 1); 0 = preset's
  c.eigs_thresh = -1                 # matrices with fewer eigenvalues are skipped; -1 = preset's
  c.esd_type = "full"                # full (adapters merged) | delta (adapter update only) | cul (W_t - W_0)
  c.precision = ""                   # float64 (host SVD) | float32 (device Gram eigvalsh); "" = preset's
  c.filter_zeros = config_dict.placeholder(bool)     # None = preset's
  c.remove_first = config_dict.placeholder(bool)     # mark the first analysed matrix as excluded
  c.remove_last = config_dict.placeholder(bool)      # mark the last analysed matrix as excluded
  c.include_lm_head = config_dict.placeholder(bool)  # the untied output head (the torch references' last layer)

  # ESD plots: these blocks ((): first, middle and last) x these projections.
  c.plot_layers = ()
  c.plot_matrices = ("q_proj", "down_proj")
  return c
