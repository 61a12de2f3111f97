"""The smoke config end to end in-process: outputs in the workdir, eval and export tasks, config errors,
and a non-finite loss that stops the run naming the step."""
import glob
import json
import os

import jax
import numpy as np
import pytest

import models
import peft
import train_lib
from configs import sft
from train_lib import build
from train_lib import validate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("smoke"))
  summary = train_lib.train_and_evaluate(sft.get_config("model=tiny,smoke"), wd)
  return wd, summary


def test_workdir_holds_events_metrics_plot_and_checkpoint(trained):
  wd, summary = trained
  assert glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train_keys = {"loss", "lr", "grad_norm", "update_norm", "param_norm", "tokens_per_s"}
  assert train_keys <= set().union(*records)
  assert {"eval/loss", "eval/exact_match"} <= set().union(*records)
  assert os.path.getsize(os.path.join(wd, "loss_curve.png")) > 1000
  assert os.path.isdir(os.path.join(wd, "checkpoints", "8"))
  assert summary["after"]["loss"] < summary["before"]["loss"]
  assert records[-1]["step"] == 8


def test_restore_and_export_round_trip(trained, tmp_path):
  wd, summary = trained
  config, model, params, _ = build.load_trained(wd)
  trained_params = peft.combine(summary["state"].params, summary["frozen"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg = build.load_config(wd)  # the saved config round-trips
  assert cfg.total_steps == 8
  out = str(tmp_path / "export")
  train_lib.run_task(_cfg(task="export", train_workdir=wd, step=0, model_type="llama", dtype=""), out)
  hf_cfg, hf_params = models.load_hf(os.path.join(out, "hf"))
  assert hf_cfg.num_layers == model.config.num_layers and hf_cfg.vocab_size == model.config.vocab_size
  for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  res = train_lib.run_task(_cfg(task="eval", train_workdir=wd, step=0,
                                eval=dict(num_examples=4, batch_size=4, max_new_tokens=8)), str(tmp_path / "ev"))
  assert 0.0 <= res["exact_match"] <= 1.0


@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_export_task_turns_a_residual_init_into_lora_for_the_original_base(tmp_path, init):
  """The export task of a PiSSA or LoRA-GA run (residual base) rebuilds the step-0 adapter and writes a
  plain LoRA for the original base: imported onto the untouched base, it gives the trained model's logits."""
  from configs import lora  # pylint: disable=g-import-not-at-top
  c = lora.get_config("model=tiny,smoke")
  c.peft.init, c.peft.data_init.batches = init, 2
  c.total_steps, c.eval_before, c.eval.num_examples = 3, False, 0
  wd = str(tmp_path / "run")
  train_lib.train_and_evaluate(c, wd)
  out = str(tmp_path / "export")
  train_lib.run_task(_cfg(task="export", train_workdir=wd, step=0, model_type="llama", dtype=""), out)
  cfg, model, trained_params, tokenizer = build.load_trained(wd)
  _, original = build.build_model(cfg, tokenizer)
  imported = peft.import_adapter(os.path.join(out, "adapter"), jax.device_get(original))
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % model.config.vocab_size
  want, got = model.apply(trained_params, tokens), model.apply(imported, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  assert float(np.abs(np.asarray(want) - np.asarray(model.apply(original, tokens))).max()) > 1e-3


def _cfg(**kw):
  import ml_collections
  return ml_collections.ConfigDict(kw)


@pytest.mark.parametrize("field,value,message", [
    ("loss.name", "dpoo", "config.loss.name='dpoo'; valid:"),
    ("optim.name", "adamz", "config.optim.name='adamz'; valid:"),
    ("model.name", "llama_9b", "config.model.name='llama_9b'; valid:"),
    ("optim.schedule", "step", "config.optim.schedule='step'; valid:"),
    ("model.remat", "some", "config.model.remat='some'; valid:"),
    ("batch_size", 7, "divisible by config.optim.grad_accum_steps"),
    ("mesh.tensor", 3, "does not fit"),
    ("task", "dance", "config.task='dance'; valid:"),
])
def test_bad_config_fails_before_compiling_listing_options(field, value, message):
  config = sft.get_config("model=tiny,smoke")
  config.optim.grad_accum_steps = 2
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(validate.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    validate.validate(config)


def test_unknown_fields_and_arguments_are_rejected():
  config = sft.get_config("model=tiny,smoke")
  config.lock()                      # as `config_flags.DEFINE_config_file(..., lock_config=True)` does
  with pytest.raises(AttributeError, match="Other fields present"):
    config.optim.learning_rat = 1.0
  with pytest.raises(ValueError, match="unknown config argument 'modle'; valid: model, smoke, steps, task"):
    sft.get_config("modle=tiny")
  config.unlock()
  config.data.task = "sortt"
  with pytest.raises(ValueError, match="sortt"):
    train_lib.train_and_evaluate(config, "/nonexistent/never/written")


def test_non_finite_loss_stops_naming_step_and_batch(tmp_path):
  config = sft.get_config("model=tiny,smoke")
  config.loss.z_loss = float("nan")
  config.eval_before = False
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 \(batch at data position .*epoch"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "8"))
