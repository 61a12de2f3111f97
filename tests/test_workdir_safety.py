"""Bad input and faults (issue 11), the fast part: option validation, listwise data for pairwise losses,
the workdir lock, the config history, atomic files, torn metrics, skip reports, progress and health
warnings, and main.py's messages. Each test is a row of the README table "Bad input and faults"."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
from configs import dpo, sft
from train_lib import checkpoint as ckpt_lib
from train_lib import metrics as metrics_lib
from train_lib import train as train_mod
from train_lib import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, field, value):
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


# ---- Part 6: options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("keep_checkpoints", 0, "config.keep_checkpoints must be > 0"),
    ("batch_size", 0, "config.batch_size must be > 0"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps must be > 0"),
    ("log_every_steps", 0, "config.log_every_steps must be > 0"),
    ("seq_len", -1, "config.seq_len must be > 0"),
    ("eval_every_steps", -5, "config.eval_every_steps must be >= 0"),
    ("eval.batch_size", 0, "config.eval.batch_size must be > 0"),
    ("total_steps", 0, "config.total_steps must be > 0"),
    ("tempbalance.enabled", True, "needs config.tempbalance.esd_interval > 0"),
    ("tempbalance.esd_interval", -1, "esd_interval must be >= 0"),
    ("resume_policy", "maybe", "config.resume_policy='maybe'; valid: strict, allow, restart"),
])
def test_nonsense_numbers_fail_before_anything_runs(field, value, message):
  config = sft.get_config("model=tiny,smoke")
  _set(config, field, value)
  with pytest.raises(validate.ConfigError, match=message.replace("(", r"\(")):
    validate.validate(config)


def test_eval_path_without_split_fails_at_start(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n')
  config = sft.get_config("model=tiny,smoke")
  config.data.source, config.data.path, config.data.tokenizer = "jsonl", str(path), "char"
  config.eval_before = False
  with pytest.raises(validate.ConfigError, match=r"test split.*no '\{split\}' placeholder"):
    validate.validate(config)
  config.data.path = str(tmp_path / "{split}.jsonl")      # the test split's file is missing
  with pytest.raises(validate.ConfigError, match="test split.*no file matches"):
    validate.validate(config)
  config.eval.num_loss_batches, config.eval.num_examples = 0, 0   # no evaluation: the train file is enough
  config.data.path = str(path)
  validate.validate(config)


# ---- Part 1: listwise data and pairwise losses -----------------------------------------------------------
def test_pairwise_loss_on_listwise_data_is_refused_without_list_to_pairs():
  config = dpo.get_config("model=tiny,kind=listwise,smoke")
  with pytest.raises(validate.ConfigError, match="pairwise loss but the data is listwise.*list_to_pairs"):
    validate.validate(config)
  config.data.list_to_pairs = "best_worst"
  validate.validate(config)
  config.data.list_to_pairs = "random"
  with pytest.raises(validate.ConfigError, match="list_to_pairs='random'; valid: None, best_worst"):
    validate.validate(config)
  lipo = dpo.get_config("model=tiny,kind=listwise,loss=lipo,smoke")
  lipo.data.list_to_pairs = "all_pairs"
  with pytest.raises(validate.ConfigError, match="is a listwise loss: drop list_to_pairs"):
    validate.validate(lipo)


def test_list_to_pairs_rules_order_by_score_and_leave_out_ties():
  scores = [0.5, 1.0, 0.5, -2.0]
  assert data.LIST_TO_PAIRS == ("best_worst", "all_pairs", "adjacent")
  from data import _preference
  assert _preference.list_pairs(scores, "best_worst") == ([(1, 3)], 0)
  assert _preference.list_pairs(scores, "all_pairs") == ([(1, 0), (0, 3), (1, 2), (1, 3), (2, 3)], 1)
  assert _preference.list_pairs(scores, "adjacent") == ([(1, 0), (2, 3)], 1)
  assert _preference.list_pairs([1.0, 1.0], "best_worst") == ([], 1)


def test_list_to_pairs_builds_pairwise_batches_and_reports_ties():
  cfg = data.default_config()
  cfg.pref_kind, cfg.train_size, cfg.list_to_pairs = "listwise", 200, "all_pairs"
  ds = data.get_dataset(cfg, "train", tokenizer=data.CharTokenizer(), batch_size=4, seq_len=32)
  batch = next(iter(ds))
  assert batch["inputs"].shape[:2] == (4, 2) and "scores" not in batch
  assert ds.report.dropped["tied_pair"] > 0                  # the built-in lists hold ties
  assert len(ds.examples) > 200                               # several pairs per list
  assert "tied_pair=" in ds.report.summary()
  assert ds.report.locate(0).startswith("builtin:sort/listwise/train:")


# ---- Part 2: the workdir lock -------------------------------------------------------------------------
def test_second_run_on_a_locked_workdir_stops_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock = ckpt_lib.WorkdirLock(str(tmp_path))
    import socket
    with open(lock.path, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": holder.pid, "started": "then"}, f)
    with pytest.raises(ckpt_lib.WorkdirError, match=f"held by process {holder.pid} on host"):
      lock.acquire()
    assert json.load(open(lock.path))["pid"] == holder.pid    # the holder's lock is untouched
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket
  lock = ckpt_lib.WorkdirLock(str(tmp_path))
  with open(lock.path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}, f)
  with lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
    assert "taking it over" in capsys.readouterr().out
  assert not os.path.exists(lock.path)


def test_lock_of_another_host_names_it_and_how_to_remove_it(tmp_path):
  lock = ckpt_lib.WorkdirLock(str(tmp_path))
  with open(lock.path, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "started": "then"}, f)
  with pytest.raises(ckpt_lib.WorkdirError, match="on host elsewhere.*delete"):
    lock.acquire()


# ---- Part 3: the config history -----------------------------------------------------------------------
def _fake_checkpoint(wd):
  os.makedirs(os.path.join(wd, "checkpoints", "4"))


def test_config_history_keeps_every_start_and_never_overwrites_config_json(tmp_path):
  wd = str(tmp_path)
  first = sft.get_config("model=tiny,smoke").to_dict()
  ckpt_lib.record_config(wd, first)
  _fake_checkpoint(wd)
  second = json.loads(json.dumps(first))
  second["total_steps"], second["eval"]["num_examples"] = 16, 4       # safe on resume
  res = ckpt_lib.record_config(wd, second)
  assert set(res["changes"]) == {"total_steps", "eval.num_examples"} and res["restarted_from"] is None
  assert json.load(open(os.path.join(wd, "config.json")))["total_steps"] == 8
  assert [os.path.basename(p) for p in ckpt_lib.history(wd)] == ["0000.json", "0001.json"]
  assert ckpt_lib.latest_config(wd)["total_steps"] == 16
  from train_lib import build
  assert build.load_config(wd).total_steps == 16        # eval / export read the newest


def test_rerun_with_an_incompatible_config_is_refused_naming_each_field(tmp_path):
  wd = str(tmp_path)
  first = sft.get_config("model=tiny,smoke").to_dict()
  ckpt_lib.record_config(wd, first)
  _fake_checkpoint(wd)
  changed = json.loads(json.dumps(first))
  changed["optim"]["learning_rate"], changed["data"]["task"] = 0.01, "add"
  before = sorted(os.listdir(wd)), open(os.path.join(wd, "config.json")).read()
  with pytest.raises(ckpt_lib.WorkdirError, match=r"data.task: 'sort' -> 'add'; optim.learning_rate: 0.003 -> "
                     r"0.01.*resume_policy=allow.*resume_policy=restart"):
    ckpt_lib.record_config(wd, changed)
  assert (sorted(os.listdir(wd)), open(os.path.join(wd, "config.json")).read()) == before   # nothing touched
  assert ckpt_lib.record_config(wd, changed, "allow")["restarted_from"] is None
  assert len(ckpt_lib.history(wd)) == 2


def test_resume_policy_restart_moves_the_earlier_run_aside(tmp_path):
  wd = str(tmp_path)
  first = sft.get_config("model=tiny,smoke").to_dict()
  ckpt_lib.record_config(wd, first)
  _fake_checkpoint(wd)
  open(os.path.join(wd, "metrics.jsonl"), "w").write('{"step": 1, "loss": 1.0}\n')
  changed = json.loads(json.dumps(first))
  changed["model"]["name"] = "small"
  res = ckpt_lib.record_config(wd, changed, "restart")
  prev = res["restarted_from"]
  assert prev == os.path.join(wd, "previous", "0000")
  assert sorted(os.listdir(prev)) == ["checkpoints", "config.json", "configs", "metrics.jsonl"]
  assert not ckpt_lib.has_checkpoint(wd) and not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  assert json.load(open(os.path.join(wd, "config.json")))["model"]["name"] == "small"


# ---- Part 4: small files and torn metrics ---------------------------------------------------------------
def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "summary.json")
  ckpt_lib.atomic_write(path, '{"a": 1}')
  ckpt_lib.atomic_write(path, '{"a": 2}')
  assert json.load(open(path)) == {"a": 2} and os.listdir(tmp_path) == ["summary.json"]
  open(path, "w").write('{"a": ')       # a torn file from an older version is ignored, not fatal
  assert ckpt_lib.read_json(path, {}) == {}


def test_metrics_jsonl_tolerates_a_torn_last_line_and_is_cut_back_on_resume(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in metrics_lib.read_jsonl(str(path))] == [1, 2]
  assert "torn last line" in capsys.readouterr().err
  path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
    metrics_lib.read_jsonl(str(path))
  first = '{"step": 1, "loss": 2.0}\n'
  path.write_text(first + '{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  w = metrics_lib.MetricWriter(str(tmp_path), start_step=1, resume_offset=len(first))
  w.write(2, {"loss": 1.25})
  w.close()
  assert metrics_lib.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}]
  path.write_text(first + '{"step": 2, "lo')          # an old checkpoint without an offset: the torn line goes
  metrics_lib.MetricWriter(str(tmp_path), start_step=1).close()
  assert path.read_text() == first


# ---- Part 5 and 7: skips counted by reason and file; data errors name file and line ------------------
def test_skipped_records_are_counted_by_reason_and_file(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"prompt": "12", "response": "21"}\n{"prompt": "3"}\nnot json\n'
                  '{"prompt": "45", "response": "54"}\n{"prompt": "1", "response": "1234567890123456789"}\n')
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.tokenizer, cfg.skip_invalid = "jsonl", str(path), "char", True
  ds = data.get_dataset(cfg, "train", tokenizer=data.CharTokenizer(), batch_size=2, seq_len=16)
  d = ds.report.as_dict()
  assert d["records"] == 5 and d["skipped"] == 2
  assert d["truncated"] == {"response": 1}          # kept, but cut to seq_len: reported too
  assert "sequences truncated (kept): response=1" in ds.report.summary()
  assert d["by_reason"] == {"bad_json": 1, "missing_field": 1}
  assert d["by_file"] == {"bad_json": {str(path): 1}, "missing_field": {str(path): 1}}
  assert ds.report.locate(1) == f"{path}:4"

  class Writer:
    rows = []

    def write(self, step, scalars):
      self.rows.append((step, scalars))
  out = train_mod.report_skips({"train": ds.report}, Writer(), 0)
  assert out["train"]["skipped"] == 2
  assert Writer.rows[0][1]["data/train/skipped/bad_json"] == 1


def test_nan_stop_names_the_records_of_the_batch(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps({"prompt": str(i), "response": str(i)}) + "\n" for i in range(6)))
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.tokenizer, cfg.packing = "jsonl", str(path), "char", "none"
  ds = data.get_dataset(cfg, "train", tokenizer=data.CharTokenizer(), batch_size=2, seq_len=16, seed=0)
  it = iter(ds)
  before = it.get_state()
  next(it)
  names = train_mod.batch_records(ds, before, it.get_state())
  lines = sorted(int(n.rsplit(":", 1)[1]) for n in names.split(", "))
  assert len(lines) == 2 and all(n.startswith(str(path)) for n in names.split(", "))
  order = ds.order(0)
  assert lines == sorted(int(i) + 1 for i in order[:2])


# ---- Part 8: progress and health ------------------------------------------------------------------------
def test_progress_eta_waits_for_steady_state_and_shows_padding():
  import io
  out = io.StringIO()
  p = metrics_lib.Progress(100, 0, stream=out)
  p.update(10, 1.0, 500.0, 0.25)     # includes compilation: no ETA yet
  p.update(20, 0.9, 800.0, 0.25)
  first, second = out.getvalue().splitlines()
  assert "ETA --:--" in first and "(pad 25%)" in first
  assert "ETA --:--" not in second


def test_zero_gradient_and_stuck_loss_warn(capsys):
  h = train_mod.HealthCheck(window=5)
  for s in range(1, 8):
    h.update(s, {"loss": 2.302585, "grad_norm": 0.0})
  assert len(h.warnings) == 2
  assert "gradient norm is 0 at step 1" in h.warnings[0]
  assert "has not moved over the last 5 steps" in h.warnings[1]
  h = train_mod.HealthCheck(window=5)
  for s in range(1, 8):
    h.update(s, {"loss": 2.0 - 0.1 * s, "grad_norm": 1.0})
  assert not h.warnings


# ---- Part 6: main.py's messages -------------------------------------------------------------------------
def _main(capsys, *args):
  """main.py in this process: (exit code, stdout, stderr)."""
  import main as main_mod
  capsys.readouterr()
  code = 0
  try:
    main_mod.parse_flags(["main.py", *args])
    main_mod.main([])
  except SystemExit as e:
    code = e.code
  finally:
    main_mod.FLAGS.unparse_flags()
  out = capsys.readouterr()
  return code, out.out, out.err


def test_main_list_and_help_show_configs_and_presets(capsys):
  for flag in ("--list", "--help"):
    code, out, _ = _main(capsys, flag)
    assert code == 0
    assert "configs/sft.py" in out and "presets: model='small', task='sort', steps=1500, smoke=False" in out
    assert "configs/dpo_kernels.py" in out and "kernel='rbf'" in out


def test_preset_argument_of_the_wrong_type_is_named():
  with pytest.raises(ValueError, match=r"config argument steps='abc': expected int \(default 1500\)"):
    sft.get_config("steps=abc")


def test_main_config_typo_is_one_line_with_the_valid_names(tmp_path, capsys):
  # In this process absl does not register the config's override flags (each is "unknown"); the field
  # messages come from main.describe_override_error, which reads the config file itself. Errors past the
  # flags run main.py in a process of its own.
  smoke = "--config=configs/sft.py:model=tiny,smoke"
  code, _, err = _main(capsys, smoke, f"--workdir={tmp_path}", "--config.optim.learnin_rate=1", "--config.zzz=2")
  assert code == 2 and "Traceback" not in err
  assert "config.optim has no field 'learnin_rate' (did you mean learning_rate?); valid:" in err
  code, _, err = _main(capsys, smoke, f"--workdir={tmp_path}", "--config.zzz=2")
  assert code == 2 and "config has no field 'zzz'; valid: async_checkpoints, batch_size" in err
  code, _, err = _main(capsys, "--config=configs/sft.py:steps=abc", f"--workdir={tmp_path}")
  assert code == 2 and "Traceback" not in err
  assert "config argument steps='abc': expected int (default 1500)" in err
  r = subprocess.run([sys.executable, "main.py", smoke, f"--workdir={tmp_path}", "--config.keep_checkpoints=0"],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "ConfigError: config.keep_checkpoints must be > 0" in r.stderr
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))
  r = subprocess.run([sys.executable, "main.py", smoke, f"--workdir={tmp_path}", "--config.total_steps=abc"],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "--config.total_steps=abc: invalid literal for int()" in r.stderr


# ---- Part 7: data errors ----------------------------------------------------------------------------------
def _jsonl_cfg(path, **kw):
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.tokenizer = "jsonl", str(path), "char"
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_non_utf8_bytes_name_file_and_line_and_a_bom_is_accepted(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"prompt": "12", "response": "21"}\n{"prompt": "3\xff", "response": "3"}\n')
  tok = data.CharTokenizer()
  with pytest.raises(data.DataError, match=rf"{path}, line 2: bad_encoding: not UTF-8: byte b'\\xff' at column 14"):
    data.get_dataset(_jsonl_cfg(path), "train", tokenizer=tok, batch_size=1, seq_len=16)
  ds = data.get_dataset(_jsonl_cfg(path, skip_invalid=True), "train", tokenizer=tok, batch_size=1, seq_len=16)
  assert len(ds.examples) == 1 and ds.report.counts == {"bad_encoding": 1}   # the BOM line is read


def test_empty_file_is_named(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n\n")
  with pytest.raises(data.DataError, match=rf"{path}: empty_file: it holds no records"):
    data.get_dataset(_jsonl_cfg(path), "train", tokenizer=data.CharTokenizer(), batch_size=1, seq_len=16)


def test_whitespace_only_responses_and_duplicate_list_entries(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"prompt": "12", "response": "  \\n"}\n')
  with pytest.raises(data.DataError, match="line 1: empty_response: the response is only whitespace"):
    data.get_dataset(_jsonl_cfg(path), "train", tokenizer=data.CharTokenizer(), batch_size=1, seq_len=16)
  from data import _preference
  rec, dropped = _preference.record_preference(
      {"prompt": "p", "responses": ["a", " ", "a", "b"], "scores": [1, 2, 0, 3]}, "listwise")
  assert rec.responses == ("a", "b") and rec.scores == (1.0, 3.0)
  assert dropped == {"empty_response": 1, "duplicate_entry": 1}
  with pytest.raises(data.DataError, match="'rejected' is empty \\(only whitespace\\)"):
    _preference.record_preference({"prompt": "p", "chosen": "a", "rejected": "\t"}, "pairwise")


# ---- Part 4 end to end: a truncated latest checkpoint ---------------------------------------------------
def _truncate_checkpoint(wd, step):
  root = os.path.join(wd, "checkpoints", str(step), "state")
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path)
      if size > 64:
        with open(path, "r+b") as f:
          f.truncate(size // 2)


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
  import jax.numpy as jnp
  wd = str(tmp_path)
  state = {"w": jnp.arange(4096, dtype=jnp.float32), "step": jnp.zeros((), jnp.int32)}
  ck = ckpt_lib.Checkpointer(wd, max_to_keep=3, async_save=False)
  for step in (4, 8):
    ck.save(step, {**state, "step": jnp.asarray(step)}, {"epoch": 0, "position": step})
  ck.close()
  _truncate_checkpoint(wd, 8)
  abstract = ckpt_lib.abstract(state)
  ck = ckpt_lib.Checkpointer(wd, max_to_keep=3, async_save=False)
  step, restored, data_state, _ = ck.restore_latest(abstract)
  out = capsys.readouterr().out
  assert step == 4 and int(restored["step"]) == 4 and data_state["position"] == 4
  assert "checkpoint step 8 at " in out and "resuming from the intact step 4" in out
  assert [n.split("-")[0] for n in os.listdir(os.path.join(wd, "corrupt_checkpoints"))] == ["8"]
  assert ck.latest_step() == 4
  ck.save(8, {**state, "step": jnp.asarray(8)}, {"epoch": 0, "position": 8})    # step 8 can be written again
  ck.close()
  for s in (4, 8):
    _truncate_checkpoint(wd, s)
  ck = ckpt_lib.Checkpointer(wd, max_to_keep=3, async_save=False)
  with pytest.raises(ckpt_lib.WorkdirError, match=r"no intact checkpoint in .*checkpoints: step 8 at .*; step 4 at"):
    ck.restore_latest(abstract)
  ck.close()


def test_tensorboard_flush_puts_every_scalar_on_disk_before_a_kill(tmp_path):
  """A kill right after `flush()` (as after a checkpoint) loses no scalar, and a resumed writer's purge
  step discards what the killed one logged after it (tensorboardX's own flush left queued events to a
  thread: the chaos test once missed the final step)."""
  code = ("import os, sys; sys.path.insert(0, os.getcwd()); from train_lib import metrics as m\n"
          f"w = m.MetricWriter({str(tmp_path)!r})\n"
          "for s in range(1, 201): w.write(s, {'loss': float(s), 'lr': 0.5})\n"
          "w.flush(); os._exit(9)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 9
  from tests.test_chaos import tensorboard_scalars
  got = tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert sorted(got["loss"]) == list(range(1, 201)) and got["loss"][200] == 200.0
  w = metrics_lib.MetricWriter(str(tmp_path), start_step=150, resume_offset=None)
  w.write(160, {"loss": -1.0})
  w.close()
  got = tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert sorted(got["loss"]) == list(range(1, 151)) + [160] and got["loss"][160] == -1.0
