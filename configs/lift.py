r"""LIFT: sparse fine-tuning of the principal weights (largest entries of each kernel's low-rank approximation).

    python main.py --config=configs/sft.py:task=sort,steps=1500 --workdir=/tmp/base       # the base model
    python main.py --config=configs/lift.py:rank=8,filter_rank=16 --config.model.init_workdir=/tmp/base \
        --workdir=/tmp/lift
    python main.py --config=configs/lift.py:model=tiny,smoke --workdir=/tmp/lift_smoke    # seconds, random base

Liu et al., *LIFT the Veil for the Truth* (ICML 2025), `zihanghliu/LIFT`: every attention/MLP kernel trains
its k = (in + out) * rank entries of largest |W_r| (W_r its rank-`filter_rank` SVD), re-picked every
`update_interval` steps, with Adam state for those entries only (`optim/_lift.py`); biases, norms, embeddings
and the head are frozen (`--no_grad head`). The reference runs Llama-2-7B with rank 128, filter_rank 64,
update_interval 400, betas (0.9, 0.95), eps 1e-6, lr 2e-4; on the 192-wide `small` model rank 128 would select
every entry, so pass a small rank there (as above).
"""
from configs import sft
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="reverse", rank=128, filter_rank=64, train_head=False, steps=1000,
                  smoke=False)
  c = sft.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  # Kernels -> LIFT; everything else frozen (set_to_zero, no state), or AdamW with train_head.
  c.optim.rules = ((r"layers/(attn|mlp)/.*_proj/kernel", "lift"),
                   (r"(embed|lm_head|final_norm)/.*", "adamw" if arg.train_head else None),
                   (".*", None))
  o = c.optim.lift
  o.rank = arg.rank                                  # k = (in + out) * rank entries per kernel (LoRA's count)
  o.filter_rank = arg.filter_rank                    # rank of the approximation that picks them
  o.update_interval = 400                            # steps between re-picks
  o.targets = r"layers/(attn|mlp)/.*_proj/kernel"
  o.b2 = 0.95                                        # the reference's betas (0.9, 0.95) and eps 1e-6
  o.eps = 1e-6
  if arg.smoke:
    o.rank = min(arg.rank, 4)
    o.filter_rank = min(arg.filter_rank, 8)
    o.update_interval = 4
  return c
