r"""TempBalance / Model Balancing: layerwise learning rates from HT-SR alpha, in low-data SFT.

    python main.py --config=configs/tempbalance.py --workdir=/tmp/tb
    python main.py --config=configs/tempbalance.py:tb=false,train_size=250 --workdir=/tmp/tb_off_250
    python main.py --config=configs/tempbalance.py:assign=sigmoid --workdir=/tmp/mb
    python main.py --config=configs/tempbalance.py:model=tiny,smoke --workdir=/tmp/tb_smoke

Every `esd_interval` steps the trainer fits the power-law exponent alpha of every projection kernel (slice
by slice of the stacked layers), logs the per-block means to TensorBoard as `alpha/block_<l>`, and, with
`tb=true`, rewrites the layerwise multipliers f of the learning rate: lr_i = eta_t * f_i (METHODS.md A4).
With `tb=false` the alphas are still fitted and logged, so the on/off pair differs only in f.

`assign=tb_linear_map` is TempBalance (Zhou et al., NeurIPS 2023): per matrix, f linear in alpha over
[0.5, 1.5], the first (block 0's q_proj) and last (lm_head) analysed matrix left at f = 1. `assign=sigmoid`
is Model Balancing (Liu et al., EMNLP 2024): per layer, f = 10^(s (sigmoid(T d) - 1/2)) with d the layer's
alpha minus the mean alpha (its `tb_std_sigmoid`), the last analysed matrix (lm_head) removed.
`mb_unit=block` gives Model Balancing's GLUE script instead (`tb_layer_blocks`, `tb_unit=block`: the mean
alpha of each decoder block through the same map, one f per block). Model Balancing reports its gains in
the low-data regime, which `train_size` (distinct training problems) controls;
benchmarks/lowdata_tempbalance.py sweeps it. Every other variant is a key of `config.tempbalance`
(`hyperparam=wd|hybrid`, `xmin_pos`, `block_unit`, `esd_type=cul`, `after_warm`, `fix_tb_metric`, ...).

The `small` model's narrowest kernels (k/v_proj, 192 x 64) fall under the references' 50-eigenvalue
threshold, so `eigs_thresh` is lowered to 32: every projection of every block is scheduled.
"""
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", tb=True, assign="tb_linear_map", mb_unit="layer",
                  train_size=1000, smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task}" + (",smoke" if arg.smoke else ""))
  c.data.train_size = arg.train_size        # distinct training problems (the low-data knob)
  if not arg.smoke:                         # sized so that a sweep of 12 runs fits ~20 min on 2 CPU cores
    c.total_steps = 300
    c.batch_size = 32                       # 9_600 examples seen: 38 epochs of 250 problems, 2.4 of 4_000
    c.optim.warmup_steps = 30
  c.checkpoint_every_steps = c.total_steps  # one checkpoint at the end: short runs, many of them
  c.eval_before = False
  c.eval.num_examples = 256                 # held-out problems scored by exact match
  c.eval.num_loss_batches = 4

  tb = c.tempbalance
  tb.enabled = arg.tb
  tb.esd_interval = 25 if not arg.smoke else 4   # steps between alpha fits (TempBalance: once per epoch)
  tb.assign = arg.assign
  if arg.assign in ("sigmoid", "tb_std_sigmoid"):
    tb.esd_preset = "model_balancing"       # median xmin, last analysed matrix (lm_head) removed
    tb.granularity = arg.mb_unit            # layer: per-layer sigmoid | block: the GLUE script's blocks
    tb.norm_rate = "block_last"             # a block's norms follow its down_proj (MB's trainer)
    tb.sigmoid_min = 1.0                    # (s_min, s_max) of Model Balancing's low-ratio GLUE rows
    tb.sigmoid_max = 1.0
    tb.exp_temp = 10.0
  else:
    tb.esd_preset = "tempbalance"           # median xmin, first and last analysed matrix removed
    tb.granularity = "layer"                # one multiplier per matrix (and per stacked slice)
    tb.lr_min_ratio = 0.5                   # f in [0.5, 1.5]
    tb.lr_slope = 1.0
  tb.eigs_thresh = 32 if arg.model != "tiny" else 16   # small: k/v_proj have N = 64 < 50
  return c
