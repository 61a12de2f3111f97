r"""OwLore (OWS): blocks drawn in proportion to their outlier ratio, GaLore inside the sampled blocks.

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/owlore.py --config.model.init_workdir=/tmp/base --workdir=/tmp/owlore
    python main.py --config=configs/owlore.py:method=owlore_alpha --config.model.init_workdir=/tmp/base \
        --workdir=/tmp/owlore_alpha                                       # p ∝ 1/alpha: no calibration data
    python main.py --config=configs/owlore.py:lora=True --config.model.init_workdir=/tmp/base \
        --workdir=/tmp/owlore_lora                     # LoRA on the sampled blocks (OwLore's --use_lora)
    python main.py --config=configs/owlore.py:model=tiny,smoke --workdir=/tmp/owlore_smoke  # seconds
    python main.py --config=configs/owlore.py:preset=paper,model=llama2_7b --config.model.hf_path=DIR \
        --config.data.source=jsonl --config.data.path=DATA --config.total_steps=N --workdir=W  # the paper's run

Li et al., *OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM
Fine-tuning* (arXiv 2405.18380; v3 renamed OWS). The outlier ratios D_l are computed once on the starting
weights (`diagnostics.outlier_ratios`) and p_l = D_l / sum D; each block keeps its optimizer state across
draws (`sampling.state=persist`, OwLore's torch behaviour; `reset` restarts it at every draw).

`preset=paper` sets what OwLore's own run sets (`pixeli99/OwLore`, commit e4159735):
  * `owlore_scripts/run_owlore_low_rank.sh`: `lisa_activated_layers=5` (gamma), `lisa_interval_steps 50` (K),
    `lisa_prob_mode owl`, `per_device_train_batch_size 16`, `gradient_accumulation_steps 1`, `galore True`,
    `learning_rate 3e-4`, `seed 111`;
  * `scripts/run_finetune_with_lisa.sh` (what that script calls): `block_size 512` (T), `--bf16
    --torch_dtype bfloat16` (bf16 weights and compute: our param_dtype and dtype), `gradient_checkpointing
    True` (remat full), `num_train_epochs 1`, `optim adamw_hf` (overridden by the GaLore optimizer below);
  * `src/lmflow/pipeline/finetuner.py`: GaLore on every `nn.Linear` under `attn`/`mlp`, `rank = 256`
    (hard-coded), `update_proj_gap 100`, `scale 1.0`, `proj_type std`; all other parameters (embeddings,
    norms, head) in the same `GaLoreAdamW` without projection; the LISA callback freezes only the decoder
    blocks, so embeddings, final norm and head always train;
  * galore-torch `GaLoreAdamW` defaults: betas (0.9, 0.999), eps 1e-6, weight_decay 0, correct_bias;
  * HF Trainer defaults (not set by the scripts): linear decay to 0 without warmup, max_grad_norm 1.0;
  * `metric_cache/llama2_7b_ratio_13.txt`: M = 13 (see `optim/_sampling.py`); OWL's calibration, 128 x 2048
    tokens of C4, is the default count, on the training data unless `sampling.calibration_data` names C4.
The model is the user's (`--config.model.hf_path`, Llama-2-7B in the paper); the data too (the paper's
commonsense / MMLU / GSM8K sets).
"""
import ml_collections

import models
from configs import sft
from configs.common import parse_arg

PRESETS = ("", "paper")


def calibration_data_overrides() -> ml_collections.ConfigDict:
  """`config.data` keys the calibration set may change; None = the training data's value."""
  ph = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      source=ph(str), path=ph(str), name=ph(str), data_dir=ph(str), hf_config=ph(str), format=ph(str),
      task=ph(str), prompt_field=ph(str), response_field=ph(str), messages_field=ph(str),
      completion_only_loss=ph(bool), pref_kind=ph(str)))


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", method="owlore", gamma=0, rank=256, steps=1000,
                  lora=False, preset="", smoke=False)
  if arg.preset not in PRESETS:
    raise ValueError(f"configs/owlore.py: preset={arg.preset!r}; valid: {PRESETS}")
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  depth = models.preset(arg.model).num_layers
  c.sampling = ml_collections.ConfigDict(dict(
      method=arg.method,         # owlore (p from outlier ratios) | owlore_alpha (p ∝ 1/alpha, HT-SR)
      # gamma=0: OwLore's 5 blocks (of Llama-2-7B's 32), at most half the depth of a smaller preset. The
      # depth comes from `model`: with --config.model.hf_path, pass the matching preset or gamma itself.
      gamma=arg.gamma or min(5, max(1, depth // 2)),
      interval_steps=50,         # K
      prob_mode="owl",           # owl (p ∝ score) | owl_reverse | uniform | increase | decrease
      state="persist",           # persist: per-block optimizer state across draws (OwLore's code) | reset
      use_lora=arg.lora,         # LoRA (config.peft) on the sampled blocks instead of their weights
      outlier_M=13.0,            # OwLore's cached ratio file name (`..._ratio_13.txt`); OWL's LLaMA runs: 5
      # Calibration: OWL's 128 rows x 2048 tokens (of C4); the data is the training data unless overridden,
      # e.g. --config.sampling.calibration_data.source=jsonl --config.sampling.calibration_data.path=c4.jsonl
      calibration_data=calibration_data_overrides(),
      calibration_split="train",
      calibration_sequences=128,
      calibration_seq_len=2048,
      calibration_batch_size=8,  # rows per forward pass (memory only)
      eigs_thresh=50,            # owlore_alpha: kernels with fewer eigenvalues stay out of the block alphas
  ))
  # GaLore on the slots' attention/MLP kernels (their norm scales get its plain Adam); the rest gets AdamW.
  # The slots' optimizer is their own: its state (projectors, moments, count) is kept per block.
  c.optim.rules = ((r"layers/.*/slots", "galore"), (".*", "adamw"))
  g = c.optim.galore
  g.projected = r"layers/(attn|mlp)/.*_proj/kernel/slots"
  g.rank = arg.rank                      # clipped per kernel to min(in, out)
  g.update_proj_gap = 100
  g.scale = 1.0
  g.proj_type = "std"
  g.eps = 1e-6
  g.weight_decay = 0.0
  if arg.lora:
    # OwLore with --use_lora: HF PEFT LoRA from LMFlow's defaults (lora_r 8, lora_alpha 32, dropout 0.1,
    # PEFT's Llama targets q_proj, v_proj); only the sampled blocks' adapters train, everything else frozen.
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 32.0
    c.peft.dropout = 0.1
    c.peft.targets = "q_proj,v_proj"
    c.optim.rules = ((r"layers/.*", "adam"), (".*", "adamw"))
    c.optim.adam.eps = 1e-6
  if arg.preset == "paper":
    c.sampling.gamma = arg.gamma or min(5, depth)   # 5 of Llama-2-7B's 32 blocks
    c.sampling.interval_steps = 50
    c.seed = 111
    c.batch_size = 16
    c.seq_len = 512
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.grad_clip_norm = 1.0
    c.optim.grad_accum_steps = 1
    c.optim.adamw.eps = 1e-6             # GaLoreAdamW's eps for the unprojected parameters too
    c.optim.adamw.weight_decay = 0.0
  if arg.smoke:
    c.sampling.gamma = arg.gamma or 1
    c.sampling.interval_steps = 4
    c.sampling.calibration_sequences = 4
    c.sampling.calibration_seq_len = c.seq_len
    c.sampling.eigs_thresh = 8
    g.rank = min(arg.rank, 8)
    g.update_proj_gap = 4
    if arg.lora:
      c.peft.rank = 4
  return c
