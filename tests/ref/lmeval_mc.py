"""Multiple-choice log-likelihoods, acc and acc_norm from lm-evaluation-harness (runs in .venv-ref).

    lmeval_mc.py IN.npz OUT.npz --model_dir=DIR --task_file=F.jsonl --vocab_size=N [--make=llama] [--chat=1]

With --make, first writes a tiny random HF model of that `hf_make_model` spec with `vocab_size` N into DIR
(which already holds the tokenizer). Then runs `lm_eval.simple_evaluate` with model "hf" (float32, CPU)
on a task defined by a YAML over the local JSONL (doc_to_text: question, doc_to_choice: choices,
doc_to_target: gold, target_delimiter " "), with log_samples; --chat=1 passes apply_chat_template=True. OUT: `lls` [all choices of all docs, in order]
(per-example log-likelihoods), `greedy` (is_greedy), `acc`, `acc_norm` [docs] per document, `acc_mean`, `acc_norm_mean`.
"""
import os
import tempfile

import numpy as np

from _common import parse_args, save

YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main():
  _, out, kw = parse_args()
  if kw.get("make"):
    import hf_make_model
    hf_make_model.BASE["vocab_size"] = int(kw["vocab_size"])
    hf_make_model.make(kw["make"], 0).save_pretrained(kw["model_dir"])
  import lm_eval
  from lm_eval.tasks import TaskManager
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "tiny_mc.yaml"), "w") as f:
      f.write(YAML.format(path=os.path.abspath(kw["task_file"])))
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={kw['model_dir']},dtype=float32", tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=tmp), device="cpu", batch_size=4, log_samples=True,
        num_fewshot=0, apply_chat_template=bool(int(kw.get("chat", "0"))))
  samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
  lls = np.array([float(r[0][0]) for s in samples for r in s["resps"]])
  greedy = np.array([bool(r[0][1]) for s in samples for r in s["resps"]])
  metrics = res["results"]["tiny_mc"]
  save(out, lls=lls, greedy=greedy, acc=np.array([s["acc"] for s in samples]),
       acc_norm=np.array([s["acc_norm"] for s in samples]),
       acc_mean=np.float64(metrics["acc,none"]), acc_norm_mean=np.float64(metrics["acc_norm,none"]))


if __name__ == "__main__":
  main()
