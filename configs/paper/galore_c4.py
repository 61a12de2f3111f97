r"""GaLore: LLaMA pre-training on C4 at 60M, 130M, 350M, 1B (and the 7B run), validation perplexity.

    python -m data.prepare c4 --src=C4_DIR --out=data/paper/c4        # c4-train.0000X-of-01024.json.gz ...
    python main.py --config=configs/paper/galore_c4.py:size=60m --workdir=W \
        --config.data.path='data/paper/c4/{split}.jsonl' --config.data.tokenizer=T5_TOKENIZER_DIR
    python main.py --config=configs/paper/galore_c4.py:size=1b --workdir=W --config.dry_run=True
    python main.py --config=configs/paper/galore_c4.py:size=350m,opt=adam ...      # the full-rank baseline

Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection* (ICML 2024), Table 2
(validation perplexity, C4): GaLore 34.88 / 25.36 / 18.95 / 15.64 at 60M / 130M / 350M / 1B with ranks
128 / 256 / 256 / 512 (unverified); full-rank Adam 34.06 / 25.08 / 18.80 / 15.56 (unverified). 7B (8-bit
GaLore, 150K steps, Table 3): 14.65 (unverified). GaLore's fine-tuning table is RoBERTa on GLUE (an
encoder this decoder codebase does not run); the 7B row here is therefore its LLaMA-7B C4 run.

Data: C4 `en` JSON shards (`{"text", "timestamp", "url"}` per line) prepared into
`data/paper/c4/{train,validation}.jsonl` of `{"text": ...}` records. Hyperparameters: configs/paper/_c4.py
(from the README commands and `torchrun_main.py`). Where they differ: the 7B row follows the README's
8-GPU `GaLore-Adam` command (lr 0.005, 32-bit states), not the single-GPU 8-bit per-layer one (lr 0.004);
our optimizer state is float32 (no 8-bit Adam).
"""
from configs.common import parse_arg
from configs.paper import _c4
from configs.paper import _recipe

PAPER = {"60m": "34.88", "130m": "25.36", "350m": "18.95", "1b": "15.64", "7b": "14.65"}
BASELINE = {"60m": "34.06", "130m": "25.08", "350m": "18.80", "1b": "15.56", "7b": ""}


def get_config(arg=None):
  arg = parse_arg(arg, size="60m", opt="galore")
  if arg.opt not in ("galore", "adam"):
    raise ValueError(f"opt={arg.opt!r}; valid: galore, adam (Fira, FRUGAL: their own recipes)")
  c = _c4.c4_config(arg.size, arg.opt)
  number = PAPER[arg.size] if arg.opt == "galore" else BASELINE[arg.size]
  return _recipe.card(
      c, name=f"galore_c4:size={arg.size},opt={arg.opt}", paper="GaLore (Zhao et al., ICML 2024)",
      table="Table 2 (7B: Table 3)", row=f"LLaMA {arg.size}, {'GaLore' if arg.opt == 'galore' else 'Full-Rank'}",
      metric="validation perplexity (C4)", number=f"{number or 'n/a'} (unverified)",
      data_file="data/paper/c4/{train,validation}.jsonl", record_format='{"text": "..."}',
      evaluation="held-out loss on ~10M validation tokens; perplexity = exp(eval/loss)",
      command=f"python main.py --config=configs/paper/galore_c4.py:size={arg.size} --workdir=W",
      follows="GaLore's README commands and code (no paper/code conflict found)")
