r"""LiPO-lambda: listwise preference optimization on UltraFeedback's scored lists of 4 responses.

    python -m data.prepare ultrafeedback --src=ULTRAFEEDBACK_JSONL --out=data/paper/ultrafeedback_lists
    python main.py --config=configs/paper/lipo.py --config.model.hf_path=SFT_MODEL --workdir=W
    python main.py --config=configs/paper/lipo.py --workdir=W --config.dry_run=True

Liu et al., *LiPO: Listwise Preference Optimization through Learning-to-Rank* (NAACL 2025). Its main
tables train T5 (an encoder-decoder, which this codebase does not run) on Reddit TL;DR and AnthropicHH with
lists of 8 scored responses; its numbers are proxy-reward win rates there (Table 2, LiPO-lambda:
unverified here). The decoder setting a reader can run is this one: Mistral-7B SFT on UltraFeedback's
lists (4 completions per prompt with GPT-4 overall scores, `format=ultrafeedback`), list size 4, beta 0.05
(LiPO's default, unverified), lr 5e-7, 1 epoch, batch 32 lists, 1024 tokens. number: "n/a (unverified)".
"""
from configs import lipo as lipo_base
from configs.common import parse_arg
from configs.paper import _recipe


def get_config(arg=None):
  arg = parse_arg(arg, loss="lipo", list_size=4)
  c = lipo_base.get_config(f"model=mistral_7b,loss={arg.loss},list_size={arg.list_size}")
  c.model.name = "mistral_7b"
  c.peft.method = None
  _recipe.file_data(c, "data/paper/ultrafeedback_lists/{split}.jsonl", fmt="ultrafeedback",
                    pref_kind="listwise", packing="none")
  c.data.list_size = arg.list_size
  c.data.max_prompt_len = 512
  c.eval_split = "test"
  c.seq_len = 1024
  c.batch_size = 32
  c.optim.grad_accum_steps = 4
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  c.eval_before = False
  c.eval.num_examples = 0
  c.eval.batch_size = 16
  c.eval.num_loss_batches = 32
  n = 63_967                             # openbmb/UltraFeedback prompts (unverified)
  c.total_steps = n // c.batch_size
  c.loss.beta = 0.05
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = c.total_steps // 10
  c.optim.end_lr_ratio = 0.0
  _recipe.gpu_mesh(c, fsdp=8)
  return _recipe.card(
      c, name=f"lipo:loss={arg.loss},list_size={arg.list_size}", paper="LiPO (Liu et al., NAACL 2025)",
      table="Table 2 (T5; not this decoder setting)", row=f"{arg.loss}, K={arg.list_size}",
      metric="held-out ranking accuracy", number="n/a (unverified)",
      data_file="data/paper/ultrafeedback_lists/{train,test}.jsonl",
      record_format="ultrafeedback: instruction, completions[{response, overall_score}]", train_records=n,
      evaluation="held-out ranking_accuracy on the test lists",
      command="python main.py --config=configs/paper/lipo.py --config.model.hf_path=SFT_MODEL --workdir=W",
      follows="the paper's loss (LiPO-lambda); hyperparameters of the DPO baseline")
