r"""OwLore (OWS) on LLaMA2-7B: commonsense reasoning, MMLU and GSM8K fine-tuning.

    python -m data.prepare commonsense --src=LLM_ADAPTERS_DATASET_DIR --out=data/paper/commonsense
    python main.py --config=configs/paper/owlore.py:setting=commonsense --config.model.hf_path=LLAMA2_7B \
        --workdir=W
    python main.py --config=configs/paper/owlore.py:setting=gsm8k --config.model.hf_path=LLAMA2_7B --workdir=W
    python main.py --config=configs/paper/owlore.py --workdir=W --config.dry_run=True

Li et al., *OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM
Fine-tuning* (arXiv 2405.18380). Hyperparameters: configs/owlore.py `preset=paper` (from OwLore's scripts,
commit e4159735: gamma 5 of 32 blocks, K 50, GaLore rank 256 gap 100 scale 1.0, lr 3e-4, batch 16, 512
tokens, 1 epoch, bf16, seed 111, outlier M 13 on 128 x 2048 calibration tokens). Where the paper's text and
the code differ (METHODS.md H2: gamma, r, K of the main tables) this recipe follows the code.

Paper numbers (LLaMA2-7B, OwLore row): commonsense (Table 2, mean of 8 suites) 70.0 (unverified); MMLU
(Table 3, 5-shot mean) 49.9 (unverified); GSM8K (Table 3) 23.4 (unverified).

Data: `commonsense` trains on LLM-Adapters' `commonsense_170k.json` (170,420 records, alpaca fields
`instruction`/`input`/`output`), evaluated on the eight suites' test sets (mc records); `mmlu` trains on
Alpaca-GPT4 (52,002 records, alpaca) and evaluates MMLU's 57 subjects (test, 14,042 questions); `gsm8k`
trains on GSM8K train (7,473 `{question, answer}`) and scores exact match of the final number on test (1,319).
"""
from configs import owlore as owlore_base
from configs.common import parse_arg
from configs.paper import _recipe

SETTINGS = {
    # setting: (train file, record format, train records, eval tasks, metric, table, number)
    "commonsense": ("data/paper/commonsense/commonsense_170k_{split}.jsonl", "alpaca", 170_420, None,
                    "mean accuracy of 8 suites", "Table 2", "70.0"),
    "mmlu": ("data/paper/alpaca_gpt4/{split}.jsonl", "alpaca", 52_002, "mc:data/paper/mmlu/test.jsonl",
             "MMLU accuracy (5-shot)", "Table 3", "49.9"),
    "gsm8k": ("data/paper/gsm8k/{split}.jsonl", "trl", 7_473, "gen:data/paper/gsm8k/test.jsonl",
              "GSM8K exact match", "Table 3", "23.4"),
}


def get_config(arg=None):
  arg = parse_arg(arg, setting="commonsense", method="owlore")
  if arg.setting not in SETTINGS:
    raise ValueError(f"setting={arg.setting!r}; valid: {', '.join(SETTINGS)}")
  path, fmt, n, tasks, metric, table, number = SETTINGS[arg.setting]
  c = owlore_base.get_config(f"preset=paper,model=llama2_7b,method={arg.method}")
  c.model.name = "llama2_7b"
  c.eval_before = False
  c.eval.num_examples = 0
  _recipe.file_data(c, path, fmt=fmt)
  c.eval_split = "train"                 # the held-out loss reads the training file; the tasks score
  c.eval.num_loss_batches = 0
  if tasks is None:
    _recipe.commonsense_eval(c)
  else:
    c.eval.tasks = tasks
  if arg.setting == "gsm8k":
    c.eval.answer_regex = r"####\s*(-?[\d,\.]+)"
    c.eval.max_new_tokens = 256
  c.total_steps = n // c.batch_size      # one epoch (`num_train_epochs 1`)
  _recipe.gpu_mesh(c, fsdp=1)
  return _recipe.card(
      c, name=f"owlore:setting={arg.setting}", paper="OwLore (Li et al., 2024)", table=table,
      row="LLaMA2-7B, OwLore", metric=metric, number=f"{number} (unverified)", data_file=path,
      record_format=fmt, train_records=n, evaluation=c.eval.tasks,
      command=f"python main.py --config=configs/paper/owlore.py:setting={arg.setting} "
              f"--config.model.hf_path=LLAMA2_7B --workdir=W",
      follows="the code (pixeli99/OwLore e4159735) where paper and code differ")
