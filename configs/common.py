"""Shared config pieces: `parse_arg` for `--config=file.py:a=1,b=x,flag` and the base ConfigDict."""
from __future__ import annotations

import ml_collections

import data
import peft


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Typed parsing of 'k=v,flag' against `defaults`; unknown keys raise, listing the valid ones.

  A bare 'flag' sets a boolean default to True. Values are converted to the default's type.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, val = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}")
    d = defaults[key]
    if not sep:
      if not isinstance(d, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(d, bool):
      if val.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={val!r}: expected true/false")
      out[key] = val.lower() in ("true", "1")
    elif d is None:
      out[key] = val
    else:
      out[key] = type(d)(val)
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every section a train config has; experiment files override what they change."""
  c = ml_collections.ConfigDict()
  c.task = "train"                        # train | eval | merge | diagnose | export
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "small"                  # a models.PRESETS name (ignored when hf_path is set)
  c.model.hf_path = ""                    # a Hugging Face model directory to start from
  c.model.init_workdir = ""               # or the workdir of an earlier run (adapters merged), e.g. SFT
  c.model.overrides = ml_collections.ConfigDict()  # DecoderConfig fields on top of the preset
  c.model.dtype = "float32"               # compute dtype (bfloat16 for mixed precision)
  c.model.param_dtype = "float32"         # master weights
  c.model.remat = "none"                  # none | full | dots | dots_no_batch
  c.model.scan_layers = True
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)  # None | xla | cudnn

  c.data = data.default_config()         # every data option (see data/_config.py), commented there
  c.data.task = "sort"                    # built-in task
  c.seq_len = 32                          # tokens per row
  c.eval_split = "test"                   # held-out split for eval loss and exact match

  c.batch_size = 64                       # global, in rows
  c.total_steps = 1000
  c.log_every_steps = 25
  c.entanglement_every_steps = 0          # pairwise runs: log gradient entanglement every N steps (0 = off)
  c.eval_every_steps = 0                  # 0: only before and after training
  c.eval_before = True
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"                  # a peft optimizer registry name
  c.optim.learning_rate = 1e-3            # peak
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"             # cosine | linear | constant
  c.optim.end_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0            # 0 disables
  c.optim.grad_accum_steps = 1
  c.optim.rules = ()                      # ((regex, optimizer name or None to freeze), ...); () = all one

  c.peft = peft.default_config()          # adapters; method None = full fine-tuning (see peft/_apply.py)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "nll"                     # a losses registry name
  c.loss.z_loss = 0.0

  # HT-SR: alpha of every weight matrix every `esd_interval` steps (TensorBoard `alpha/block_<l>`), and
  # TempBalance / Model Balancing layerwise learning rates from those alphas.
  c.tempbalance = ml_collections.ConfigDict()
  c.tempbalance.enabled = False
  c.tempbalance.esd_interval = 0          # steps between ESD fits; 0 = never (TempBalance needs > 0)
  c.tempbalance.esd_preset = "tempbalance"  # tempbalance | model_balancing | weightwatcher (xmin rule etc.)
  c.tempbalance.assign = "tb_linear_map"  # tb_linear_map | tb_sqrt | tb_log2 | tb_step | sigmoid | ...
  c.tempbalance.granularity = "layer"     # layer (per matrix) | block (mean alpha per decoder block)
  c.tempbalance.lr_min_ratio = 0.5        # linear map: s1
  c.tempbalance.lr_slope = 1.0            # linear map: s2 - s1
  c.tempbalance.sigmoid_min = 2.0         # Model Balancing sigmoid: s_min
  c.tempbalance.sigmoid_max = 1.0         # Model Balancing sigmoid: s_max
  c.tempbalance.exp_temp = 10.0           # Model Balancing sigmoid: temperature
  c.tempbalance.normalize = False         # rescale multipliers to mean 1
  c.tempbalance.eigs_thresh = 50          # matrices with fewer eigenvalues keep the base LR

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_loss_batches = 2             # held-out loss batches
  c.eval.num_examples = 200               # generations scored by the task's verifier (exact match)
  c.eval.max_new_tokens = 16
  return c
