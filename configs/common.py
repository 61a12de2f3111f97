"""Shared config pieces: `parse_arg` for `--config=file.py:a=1,b=x,flag` and the base ConfigDict."""
from __future__ import annotations

import ml_collections

import data
import losses
import optim
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
      try:
        out[key] = type(d)(val)
      except ValueError:
        raise ValueError(f"config argument {key}={val!r}: expected {type(d).__name__} (default {d!r})") from None
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every section a train config has; experiment files override what they change."""
  c = ml_collections.ConfigDict()
  c.task = "train"                        # train | eval | diagnose | export | sweep | merge
  c.seed = 0
  c.dry_run = False                       # validate, build shapes, compile the step, report (train_lib/dry_run.py)

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
  # Tile side of the losses' tiled head (losses/_chunked.py; 0: full [B, T, V] logits); None: the model's
  # default (models.DecoderConfig.logits_chunk).
  c.model.logits_chunk = ml_collections.config_dict.placeholder(int)

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
  # A rerun of a workdir whose checkpoints were written with another config: strict = resume only when the
  # changed fields are safe on resume (train_lib/checkpoint.py SAFE_ON_RESUME: steps, intervals, eval,
  # mesh), else stop naming each change; allow = resume anyway; restart = move the earlier run to
  # workdir/previous/NNNN and start from step 0.
  c.resume_policy = "strict"
  c.stuck_loss_window = 200               # warn when the loss has not moved over this many steps (0 = off)

  # name, learning rate and schedule, clipping, accumulation, rules; then one section per registered
  # optimizer with its options and their defaults (`--config.optim.galore.rank=64`), see optim/_factory.py.
  c.optim = optim.default_config()

  c.peft = peft.default_config()          # adapters; method None = full fine-tuning (see peft/_apply.py)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "nll"                     # a losses registry name
  c.loss.z_loss = 0.0
  c.loss.aux_weights = losses.aux_default_weights()   # {term: weight} of terms the model sows (loramoe_blc)

  # HT-SR: alpha of every weight matrix every `esd_interval` steps (TensorBoard `alpha/block_<l>`), and
  # TempBalance / Model Balancing layerwise learning rates from those alphas. Every field with its default
  # and meaning: optim/_tempbalance.py (RunConfig, TempBalanceConfig).
  c.tempbalance = optim.tempbalance_default_config()

  # The frozen reference of the losses that read one (DPO family). Default: the start weights. `soup`:
  # comma-separated workdirs of SFT runs whose uniform weight-space average is the reference (SALSA).
  c.reference = ml_collections.ConfigDict()
  c.reference.soup = ""

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_loss_batches = 2             # held-out loss batches
  c.eval.num_examples = 200               # generations scored by the task's verifier (exact match)
  c.eval.max_new_tokens = 16
  # Task files in the lm-evaluation-harness style, "KIND:PATH,..." (KIND mc | gen | ppl | pref | winrate,
  # detected from the fields when left out); each reports NAME/metric (train_lib/eval_tasks.py, judges.py).
  c.eval.tasks = ""
  c.eval.num_task_examples = 0            # records per task file (0: all)
  c.eval.mc_template = "Question: {question}\nAnswer:"   # context of mc records without query/prompt
  c.eval.target_delimiter = " "           # put before each choice (lm-eval's default)
  c.eval.gen_template = "Question: {question}\nAnswer:"  # prompt of gen records without prompt
  c.eval.until = "Question:"              # generations are cut at the first of these ("|"-separated)
  c.eval.apply_chat_template = False      # mc/gen prompts as a user turn of the chat template (lm-eval's flag)
  c.eval.answer_regex = ""                # a further extraction regex (first match, group 1): regex_match
  c.eval.max_len = 2048                   # tokens of a scored sequence (left-truncated beyond)
  c.eval.win_rate = False                 # win rate vs the reference on the held-out prompts of the data
  c.eval.judge = "verifier"               # verifier | module:function | rm:DIR (workdir or HF checkpoint)
  return c
