"""LLaMA pre-training on C4 as GaLore's `torchrun_main.py` runs it; shared by galore_c4, fira_c4, frugal_c4.

From `jiaweizzhao/GaLore` (README commands and `configs/llama_<size>.json`): T5 tokenizer (`t5-base`),
sequences of 256 tokens (`--max_length 256`, truncated and padded per document, not packed: our
`packing=none`), 512 sequences per step (`--total_batch_size 512`), bf16, lr 0.01 with linear warmup over
10% of the steps and cosine decay to 10% (`--scheduler cosine --min_lr_ratio 0.1`), weight decay 0, no
clipping below 7B (`--grad_clipping 0.0`; 1.0 at 7B), GaLore on every attention/MLP kernel
(`target_modules_list = ["attn", "mlp"]`), Adam on the rest. Evaluation: perplexity on 10M tokens of C4
validation (`evaluate_model`, `target_eval_tokens=10_000_000`).
"""
from configs.paper import _recipe

# size: (GaLore rank, steps, warmup, lr)
SCHEDULE = {
    "60m": (128, 10_000, 1_000, 0.01),
    "130m": (256, 20_000, 2_000, 0.01),
    "350m": (256, 60_000, 6_000, 0.01),
    "1b": (512, 100_000, 10_000, 0.01),
    "7b": (1024, 150_000, 15_000, 0.005),   # README "LLaMA-7B, GaLore-Adam, 8 A100": gap 500, clip 1.0
}


def c4_config(size: str, opt: str):
  if size not in _recipe.LLAMA_C4:
    raise ValueError(f"size={size!r}; valid: {', '.join(_recipe.LLAMA_C4)}")
  rank, steps, warmup, lr = SCHEDULE[size]
  shape = dict(_recipe.LLAMA_C4[size])
  c = _recipe.base("llama2_7b", num_kv_heads=shape["num_heads"], norm_eps=1e-6,
                   max_position_embeddings=2048 if size == "7b" else 1024, **shape)
  c.model.param_dtype = "bfloat16"        # `--dtype bfloat16`: the model itself is bf16
  c.model.remat = "full" if size in ("1b", "7b") else "none"
  _recipe.file_data(c, "data/paper/c4/{split}.jsonl", fmt="trl", tokenizer="t5-base", completion_only=False,
                    packing="none")       # {"text": ...}; the tokenizer directory of t5-base
  c.eval_split = "validation"
  c.seq_len = 256
  c.batch_size = 512
  c.total_steps = steps
  c.eval_every_steps = 1000
  c.eval.num_loss_batches = 10_000_000 // (512 * 256) + 1   # ~10M validation tokens
  o = c.optim
  o.name = opt if opt != "adam" else "adamw"
  o.learning_rate = lr
  o.warmup_steps = warmup
  o.schedule = "cosine"
  o.end_lr_ratio = 0.1
  o.grad_clip_norm = 1.0 if size == "7b" else 0.0
  o.adamw.weight_decay = 0.0
  o.adamw.eps = 1e-6 if opt != "adam" else 1e-8    # galore-torch AdamW's eps; torch AdamW's for the baseline
  projected = r"layers/(attn|mlp)/.*_proj/kernel"
  if opt in ("galore", "fira"):
    g = o[opt]
    g.rank = rank
    g.update_proj_gap = 500 if size == "7b" else 200
    g.scale = 0.25
    g.proj_type = "std"
    g.eps = 1e-6
    g.weight_decay = 0.0
    g.projected = projected
  elif opt == "frugal":
    f = o.frugal
    f.density = 0.25
    f.update_gap = 200
    f.subspace = "block"                  # the `--optimizer frugal` default: whole-tensor blocks
    f.inactive_update_rule = "sign_sgd"
    f.inactive_lr_scale = 1.0             # pre-training value
    f.projected = projected
    f.weight_decay = 0.0
  # Data-parallel over every device; FSDP for the 1B and 7B states.
  _recipe.gpu_mesh(c, fsdp=8 if size in ("1b", "7b") else 1)
  return c
