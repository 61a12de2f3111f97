"""The paper recipes (configs/paper/): full-size parameter counts against the papers' model sizes
(jax.eval_shape only), and the dry run of every recipe on 8 simulated CPU devices with the reduction of
`configs/paper/_recipe.reduced` (2 blocks, width 128, vocabulary 512, 16 rows of 64 tokens; ranks <= 16,
gamma 1), one subprocess for the file.

Compiling a train step costs about 5-10 s of CPU here whatever the width, so the default run compiles one
recipe per family of step (projected-optimizer pre-training, layer sampling with GaLore, pairwise DPO with a
frozen reference) and builds the rest without compiling; COMPILE_ALL_RECIPES=1 compiles every recipe (about
2 min of CPU more, outside the suite's budget).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from tests import train_runner

import models
from configs.paper import _recipe
from train_lib import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = ("galore_c4:size=60m", "owlore:setting=commonsense", "dpo_ultrafeedback")
TRAIN_RECIPES = tuple(s for s in _recipe.RECIPES if s != "ties_merge")


def llama_params(V, D, L, H, KV, F, hd=None):
  """Parameters of an untied LLaMA decoder without biases, from its shape (written out, not the model)."""
  hd = hd or D // H
  attn = D * H * hd + 2 * D * KV * hd + H * hd * D
  return 2 * V * D + L * (attn + 3 * D * F + 2 * D) + D


# =====================================================================================================
# Full size: eval_shape only
# =====================================================================================================
@pytest.mark.parametrize("spec,expected", [
    ("galore_c4:size=60m", 58_073_600), ("galore_c4:size=130m", 134_105_856),
    ("galore_c4:size=350m", 367_969_280), ("galore_c4:size=1b", 1_339_082_752),
    ("galore_c4:size=7b", 6_738_415_616), ("owlore:setting=commonsense", 6_738_415_616),
    ("lisa", 6_738_415_616), ("tempbalance", 6_738_415_616), ("dpo_ultrafeedback", 7_241_732_096),
    ("lipo", 7_241_732_096)])
def test_full_size_parameter_count(spec, expected):
  c = _recipe.load(spec)
  cfg = dry_run.model_config(c)
  n = dry_run.tree_count(jax.eval_shape(models.Decoder(cfg).init, jax.random.PRNGKey(0)))
  assert n == expected == llama_params(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                       cfg.num_kv_heads, cfg.intermediate_size)
  if "galore_c4" in spec:   # the papers' names for these shapes: 60M, 130M, 350M, 1B (1.3B), 7B (6.74B)
    size = spec.split("=")[1]
    assert 0.75 < n / _recipe.NOMINAL_PARAMS[size] < 1.35
  if n > 6e9:
    assert round(n / 1e9, 2) in (6.74, 7.24)    # LLaMA(2)-7B; Mistral-7B


def test_every_recipe_has_its_card():
  for spec in _recipe.RECIPES:
    c = _recipe.load(spec)
    r = c.recipe
    for key in ("paper", "table", "row", "metric", "number", "data_file", "record_format", "command"):
      assert r[key], (spec, key)
    assert "configs/paper/" in r.command, spec


# =====================================================================================================
# Reduced: the dry run of every recipe in one 8-device subprocess
# =====================================================================================================
_SCRIPT = textwrap.dedent("""
    import json, sys
    from configs.paper import _recipe
    from train_lib import dry_run
    specs, compiled, out = sys.argv[1].split(";"), sys.argv[2].split(";"), sys.argv[3]
    res = {}
    for spec in specs:
      c = _recipe.load(spec)
      if c.get("task") != "merge":
        c = _recipe.reduced(c)
      res[spec] = dry_run.dry_run(c, out + "/" + spec.replace(":", "_"), verbose=False,
                                  compile_step=spec in compiled)
    json.dump(res, open(out + "/all.json", "w"), default=str)
""")


def _run(specs, compiled, tmp):
  env = {**os.environ, "XLA_FLAGS": train_runner.devices_flags(8), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  p = subprocess.run([sys.executable, "-c", _SCRIPT, ";".join(specs), ";".join(compiled), str(tmp)], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.load(open(os.path.join(tmp, "all.json")))


def _check(spec, r, compiled):
  if r.get("task") == "merge":
    assert r["parameters"] == 6_738_415_616 and r["method"] == "ties"
    assert r["streaming_float32_bytes_per_tensor"] < r["whole_tree_float32_bytes"] / 40   # the embedding vs 7B
    return
  m = _recipe.REDUCED_MODEL
  assert r["devices"] == 8 and r["parameters"] == llama_params(m["vocab_size"], m["hidden_size"], m["num_layers"],
                                                               m["num_heads"], m["num_kv_heads"],
                                                               m["intermediate_size"])
  assert r["batch"]["inputs"][0] == _recipe.REDUCED["batch_size"] and r["batch"]["inputs"][-1] == 64
  full = _recipe.load(spec)
  assert r["total_steps"] == full.total_steps > 0
  moments = 2 * r["parameter_bytes"] * r["trainable_parameters"] / r["parameters_with_transforms"]
  name = spec.split(":")[0]
  if name in ("galore_c4", "fira_c4", "owlore"):        # projected moments: below full Adam's
    assert r["optimizer_state_bytes"] < 0.9 * moments
  if name in ("owlore", "lisa"):                          # gamma = 1 of 2 blocks trains
    assert r["trainable_parameters"] < r["parameters"]
  if name == "tempbalance":                               # LoRA
    assert r["trainable_parameters"] < 0.2 * r["parameters"]
  if name in ("dpo_ultrafeedback", "dpo_kernels", "lipo"):   # full fine-tuning, frozen reference copy
    assert r["trainable_parameters"] == r["parameters"] and r["reference_bytes"] > 0
  if spec in compiled:
    assert r["per_device_memory"]["peak_estimate_bytes"] > r["parameter_bytes"] / 8
    assert r["flops_per_step"] > 6 * r["parameters"] * 16 * 64 / 8 * 0.5   # ~6 N tokens per device


def test_dry_run_every_recipe(tmp_path):
  res = _run(_recipe.RECIPES, COMPILED, tmp_path)
  assert set(res) == set(_recipe.RECIPES)
  for spec, r in res.items():
    _check(spec, r, COMPILED)
    assert os.path.exists(os.path.join(tmp_path, spec.replace(":", "_"), "dry_run.json"))
  owl = res["owlore:setting=commonsense"]
  assert owl["stand_ins"] and "uniform" in owl["stand_ins"][0]
  assert any("data/paper/c4" in s for s in res["galore_c4:size=60m"]["data_files_missing"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COMPILE_ALL_RECIPES"), reason="about 2 min of CPU: COMPILE_ALL_RECIPES=1")
def test_dry_run_compiles_every_recipe(tmp_path):
  rest = [s for s in TRAIN_RECIPES if s not in COMPILED]
  res = _run(rest, rest, tmp_path)
  for spec, r in res.items():
    _check(spec, r, rest)


def test_dry_run_rejects_a_bad_recipe():
  c = _recipe.reduced(_recipe.load("lisa"))
  c.optim.name = "no_such_optimizer"
  with pytest.raises(Exception, match="no_such_optimizer"):
    dry_run.dry_run(c, None, verbose=False, compile_step=False)
