"""End to end on a tiny Qwen2-shaped checkpoint whose tokenizer has no BOS: the README's "Evaluation"
example (SFT from the HF directory, DPO with LoRA, the eval task on local benchmark files, export) run as
written with small files and 4 steps; then the exports, of that run and of a built-in-task run
(CharTokenizer), loaded by transformers' AutoTokenizer / AutoModelForCausalLM and `generate` in the
reference environment, equal to ours."""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_runner

import data
import models
import train_lib
from configs import sft
from tests import eval_workspace
from tests import refenv
from train_lib import generation as gen_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_example() -> str:
  text = (ROOT / "README.md").read_text()
  section = text[text.index("## Evaluation"):]
  section = section[:section.index("\n## ", 5)]
  return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("readme"))
  ws = eval_workspace.make(root)
  values = {"CKPT": ws["ckpt"], "DATA": ws["data"], "OUT": os.path.join(root, "out"), "STEPS": "4"}
  script = readme_example()
  for name, value in values.items():
    script, n = re.subn(rf"^{name}=\S+", f"{name}={value}", script, flags=re.M)
    assert n == 1, f"the README example sets {name} once"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  env["XLA_FLAGS"] = train_runner.devices_flags(1)
  r = subprocess.run(["bash", "-e", "-c", script], cwd=str(ROOT), env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
  return ws, values["OUT"], r.stdout


def test_readme_example_runs_sft_dpo_eval_export(readme_run):
  ws, out, stdout = readme_run
  for stage in ("sft", "dpo"):
    summary = json.load(open(os.path.join(out, stage, "summary.json")))
    assert {"before", "after"} <= set(summary)
  dpo = json.load(open(os.path.join(out, "dpo", "summary.json")))["after"]
  assert {"rewards/accuracies", "ranking_accuracy", "exact_match"} <= set(dpo)
  res = json.load(open(os.path.join(out, "eval", "eval.json")))
  for key in ("arc/acc", "arc/acc_norm", "gsm8k/strict_match", "gsm8k/flexible_extract", "wiki/token_perplexity",
              "prefs_test/rewards/accuracies", "prefs_test/ranking_accuracy", "prompts/win_rate", "exact_match"):
    assert key in res and np.isfinite(res[key]), key
  hf = os.path.join(out, "export", "hf")
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= set(os.listdir(hf))
  tok = data.load_tokenizer(hf)
  assert tok.bos_id is None and tok.chat_template        # no BOS; the chat template travelled
  assert json.load(open(os.path.join(hf, "generation_config.json")))["eos_token_id"] == tok.token_to_id("<|im_end|>")


def _check_in_transformers(hf_dir, texts, prompt, expected_ids, chat=None, max_new_tokens=8):
  """AutoTokenizer's ids equal `expected_ids`; greedy generate equals ours up to our first stop token."""
  tok = data.load_tokenizer(hf_dir)
  spec = dict(texts=texts, prompt=prompt, max_new_tokens=max_new_tokens, chat=chat)
  res = json.loads(str(refenv.run("hf_export_check", dir=hf_dir, spec=json.dumps(spec))["result"]))
  assert res["encoded"] == expected_ids
  assert res["prompt_ids"] == data.encode_prompt(tok, prompt)
  cfg, params = models.load_hf(hf_dir)
  stops = data.stop_ids(tok)
  ours = gen_lib.generate(models.Decoder(cfg), params, [res["prompt_ids"]], max_new_tokens=max_new_tokens,
                          stop_ids=stops)[0]
  assert res["generated"][:len(ours)] == ours
  assert len(res["generated"]) == len(ours) or res["generated"][len(ours)] in stops
  return res


@pytest.mark.parity
def test_qwen2_export_loads_and_generates_in_transformers(readme_run):
  refenv.require()
  ws, out, _ = readme_run
  hf = os.path.join(out, "export", "hf")
  tok = data.load_tokenizer(hf)
  texts = ["What is 2+3?", "2+3=5. #### 5"]
  chat = [{"role": "user", "content": "What is 2+3?"}]
  res = _check_in_transformers(hf, texts, tok.apply_chat_template(chat, add_generation_prompt=True),
                               [data.encode_prompt(tok, t) for t in texts], chat=chat)
  assert res["chat_text"] == tok.apply_chat_template(chat, add_generation_prompt=True)
  assert res["decoded"] == texts


@pytest.mark.parity
def test_char_tokenizer_export_loads_and_generates_in_transformers(tmp_path):
  refenv.require()
  wd = str(tmp_path / "sft")
  train_lib.train_and_evaluate(sft.get_config("model=tiny,smoke"), wd)
  train_lib.run_task(_cfg(task="export", train_workdir=wd, step=0, model_type="llama", dtype=""),
                     str(tmp_path / "export"))
  hf = str(tmp_path / "export" / "hf")
  tok = data.CharTokenizer()
  texts = ["sort 3 1 2", "123+45=168"]
  res = _check_in_transformers(hf, texts, "sort 93125:", [tok.encode(t, add_bos=True) for t in texts])
  assert res["decoded"] == texts
  assert res["eos_token_id"] == tok.eos_id


def _cfg(**kw):
  import ml_collections
  return ml_collections.ConfigDict(kw)
