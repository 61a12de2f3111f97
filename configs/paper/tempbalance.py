r"""Model Balancing / TempBalance in low-data LLM fine-tuning: LLaMA-7B with LoRA, layerwise learning rates.

    python -m data.prepare commonsense --src=LLM_ADAPTERS_DATASET_DIR --out=data/paper/commonsense
    python main.py --config=configs/paper/tempbalance.py:ratio=0.1 --config.model.hf_path=LLAMA_7B --workdir=W
    python main.py --config=configs/paper/tempbalance.py:tb=false --config.model.hf_path=LLAMA_7B --workdir=W
    python main.py --config=configs/paper/tempbalance.py --workdir=W --config.dry_run=True

Liu et al., *Model Balancing Helps Low-data Training and Fine-tuning* (EMNLP 2024). Its main tables are
RoBERTa on GLUE and neural PDE solvers; the LLM setting a decoder runs is its LLaMA-7B LoRA fine-tuning in
low-data ratios (the repository's `lora_esd_estimator` path). Whether the paper reports it, and its number,
are unverified (METHODS.md H3): number "n/a (unverified)". What this recipe sets: Model Balancing's
per-layer sigmoid map (`tb_std_sigmoid`, s in [1, 1] of its low-ratio GLUE rows, T = 10), ESD of the LoRA-
merged weights every `esd_interval` steps, LoRA rank 8 alpha 16 on q/k/v/o/gate/up/down, lr 3e-4
(unverified), batch 16, 256 tokens, 3 epochs of `ratio` x 170,420 commonsense records (LLM-Adapters'
commonsense_170k), evaluated on the eight commonsense suites. `tb=false` is the same run without the
layerwise multipliers (the baseline of the on/off pair); `assign=tb_linear_map` gives TempBalance's map.
"""
from configs import tempbalance as tb_base
from configs.common import parse_arg
from configs.paper import _recipe


def get_config(arg=None):
  arg = parse_arg(arg, ratio=0.1, tb=True, assign="sigmoid")
  c = tb_base.get_config(f"model=llama2_7b,tb={arg.tb},assign={arg.assign}")
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  _recipe.file_data(c, "data/paper/commonsense/commonsense_170k_{split}.jsonl", fmt="alpaca")
  n = int(_recipe.RECORDS["commonsense_170k"] * arg.ratio)
  c.data.train_size = n
  c.eval_split = "train"
  c.eval.num_loss_batches = 0
  c.eval.num_examples = 0
  _recipe.commonsense_eval(c)
  c.seq_len = 256
  c.batch_size = 16
  c.total_steps = max(1, 3 * n // c.batch_size)
  c.checkpoint_every_steps = 1000
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 100
  c.peft.method = "lora"
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  c.tempbalance.esd_interval = max(1, n // c.batch_size)   # once per epoch (TempBalance's cadence)
  c.tempbalance.eigs_thresh = 50
  _recipe.gpu_mesh(c)
  return _recipe.card(
      c, name=f"tempbalance:ratio={arg.ratio},tb={arg.tb},assign={arg.assign}",
      paper="Model Balancing (Liu et al., EMNLP 2024); TempBalance (Zhou et al., NeurIPS 2023)",
      table="n/a (LLM setting of the code)", row=f"LLaMA-7B LoRA, data ratio {arg.ratio}",
      metric="mean accuracy of 8 commonsense suites", number="n/a (unverified)",
      data_file="data/paper/commonsense/commonsense_170k_{train}.jsonl", record_format="alpaca",
      train_records=n, evaluation=c.eval.tasks,
      command=f"python main.py --config=configs/paper/tempbalance.py:ratio={arg.ratio} "
              f"--config.model.hf_path=LLAMA_7B --workdir=W",
      follows="the repository's scripts (the paper's LLM setting is unconfirmed)")
