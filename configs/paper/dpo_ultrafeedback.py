r"""DPO on UltraFeedback (Zephyr-7B-beta): the common baseline of the preference recipes.

    python -m data.prepare ultrafeedback_binarized --src=ULTRAFEEDBACK_PARQUET_DIR --out=data/paper/ultrafeedback
    python main.py --config=configs/paper/dpo_ultrafeedback.py --config.model.hf_path=ZEPHYR_SFT \
        --workdir=W
    python main.py --config=configs/paper/dpo_ultrafeedback.py --workdir=W --config.dry_run=True

Tunstall et al., *Zephyr: Direct Distillation of LM Alignment* (arXiv 2310.16944), Table 1: Zephyr-7B
(dDPO) MT-Bench 7.34, AlpacaEval win rate 90.60% (unverified). The recipe follows the alignment-handbook's
`recipes/zephyr-7b-beta/dpo/config_full.yaml` (unverified): full fine-tuning of the SFT model
(`zephyr-7b-sft-full`, a Mistral-7B), beta 0.01, lr 5e-7, linear warmup over 10% then cosine to 0
(`warmup_ratio 0.1`, `lr_scheduler_type cosine`), 1 epoch, global batch 128 (8 GPUs x 8 x accumulation 2),
max_length 1024, max_prompt_length 512, bf16, seed 42; the paper's text reports beta 0.1 and 3 epochs
for the released model: this recipe follows the handbook's code, and `--config.loss.beta=0.1
--config.total_steps=1434` gives the paper's.

Data: HuggingFaceH4/ultrafeedback_binarized, `train_prefs` (61,135) and `test_prefs` (2,000), records
`{"prompt", "chosen": [messages], "rejected": [messages], "score_chosen", "score_rejected"}`, read with
`format=ultrafeedback_binarized` (data/FORMATS.md). Evaluation: held-out reward accuracy / margins on
test_prefs here; MT-Bench and AlpacaEval need their judges (export the model).
"""
from configs import dpo as dpo_base
from configs.common import parse_arg
from configs.paper import _recipe


def preference_base(c):
  """What the UltraFeedback preference recipes share: data, lengths, batch and mesh."""
  _recipe.file_data(c, "data/paper/ultrafeedback/{split}.jsonl", fmt="ultrafeedback_binarized",
                    pref_kind="pairwise", packing="none")
  c.eval_split = "test"
  c.data.max_prompt_len = 512
  c.seq_len = 1024
  c.batch_size = 128
  c.optim.grad_accum_steps = 2
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  c.eval_before = False
  c.eval.num_examples = 0
  c.eval.batch_size = 64
  c.eval.num_loss_batches = 2_000 // 64
  _recipe.gpu_mesh(c, fsdp=8)
  return c


def get_config(arg=None):
  arg = parse_arg(arg, beta=0.01, epochs=1)
  c = dpo_base.get_config("model=mistral_7b,adapter=none")
  c.model.name = "mistral_7b"
  preference_base(c)
  n = _recipe.RECORDS["ultrafeedback_binarized/train_prefs"]
  c.total_steps = arg.epochs * n // c.batch_size
  c.seed = 42
  c.loss.beta = arg.beta
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = c.total_steps // 10
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.0
  c.optim.grad_clip_norm = 1.0
  c.optim.adamw.weight_decay = 0.0
  return _recipe.card(
      c, name="dpo_ultrafeedback", paper="Zephyr (Tunstall et al., 2023)", table="Table 1",
      row="Zephyr-7B (dDPO)", metric="MT-Bench / AlpacaEval", number="7.34 / 90.60% (unverified)",
      data_file="data/paper/ultrafeedback/{train,test}.jsonl",
      record_format="ultrafeedback_binarized: prompt, chosen/rejected message lists", train_records=n,
      evaluation="held-out rewards/accuracies on test_prefs; MT-Bench, AlpacaEval on the export",
      command="python main.py --config=configs/paper/dpo_ultrafeedback.py --config.model.hf_path=ZEPHYR_SFT "
              "--workdir=W",
      follows="the alignment-handbook config (beta 0.01, 1 epoch) over the paper text (beta 0.1, 3 epochs)")
