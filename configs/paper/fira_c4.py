r"""Fira: LLaMA pre-training on C4 (GaLore's setting), validation perplexity.

    python main.py --config=configs/paper/fira_c4.py:size=60m --workdir=W --config.data.tokenizer=T5_DIR
    python main.py --config=configs/paper/fira_c4.py:size=1b --workdir=W --config.dry_run=True

Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs under Low-rank Constraint?* (arXiv
2410.01623), Table 1 (validation perplexity, C4): Fira 31.06 / 22.73 / 16.85 / 15.14 at 60M / 130M / 350M /
1B (unverified), ranks 128 / 256 / 256 / 512 as GaLore. Fira's README recipe: GaLore's pre-training
script with `--optimizer fira_adamw`, alpha (scale) 0.25, the norm-growth limiter gamma 1.01, lr 0.01.
Data, schedule and shapes: configs/paper/_c4.py. The 7B row (Fira's LLaMA-7B run, 8-bit free) is `size=7b`
with GaLore's 7B schedule (unverified against Fira's own 7B script).
"""
from configs.common import parse_arg
from configs.paper import _c4
from configs.paper import _recipe

PAPER = {"60m": "31.06", "130m": "22.73", "350m": "16.85", "1b": "15.14", "7b": "n/a"}


def get_config(arg=None):
  arg = parse_arg(arg, size="60m")
  c = _c4.c4_config(arg.size, "fira")
  c.optim.fira.gamma = 1.01             # norm-growth limiter
  return _recipe.card(
      c, name=f"fira_c4:size={arg.size}", paper="Fira (Chen et al., 2024)", table="Table 1",
      row=f"LLaMA {arg.size}, Fira", metric="validation perplexity (C4)",
      number=f"{PAPER[arg.size]} (unverified)", data_file="data/paper/c4/{train,validation}.jsonl",
      record_format='{"text": "..."}', evaluation="held-out loss on ~10M validation tokens",
      command=f"python main.py --config=configs/paper/fira_c4.py:size={arg.size} --workdir=W",
      follows="Fira's README (GaLore's script with fira_adamw, scale 0.25)")
