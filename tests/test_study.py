"""benchmarks/study.py: the seed statistics, the "larger than the seed spread" rule, README span replacement,
and one block end to end in --quick mode (the JSONL, the table with its seed columns, re-aggregation)."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from benchmarks import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t_quantile_closed_form(p: float, df: int) -> float:
  """Student-t quantiles with closed forms: df 1 (Cauchy) and df 2 (F(t) = 1/2 + t / (2 sqrt(2 + t^2)))."""
  if df == 1:
    return math.tan(math.pi * (p - 0.5))
  assert df == 2
  a = 2 * p - 1
  return a * math.sqrt(2 / (1 - a * a))


def test_mean_ci_is_the_student_t_interval():
  x = [0.5, 0.7, 0.95]                                      # n = 3: df 2
  mean = sum(x) / 3
  s = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)
  want = t_quantile_closed_form(0.975, 2) * s / math.sqrt(3)
  m, h, n = study.mean_ci(x)
  assert n == 3 and m == pytest.approx(mean, rel=1e-12) and h == pytest.approx(want, rel=1e-9)
  assert want == pytest.approx(4.302652729749463 * s / math.sqrt(3), rel=1e-12)   # the tabulated t_{.975,2}
  m, h, n = study.mean_ci([0.25, 0.75, None, float("nan")])   # n = 2 after dropping the missing values
  assert n == 2 and m == pytest.approx(0.5) and h == pytest.approx(
      t_quantile_closed_form(0.975, 1) * math.sqrt(0.125) / math.sqrt(2), rel=1e-9)
  assert study.mean_ci([0.3]) == (0.3, float("inf"), 1)      # one seed: no spread to estimate
  assert study.mean_ci([])[2] == 0
  m, h, _ = study.mean_ci([2.0, 2.0, 2.0])
  assert (m, h) == (2.0, 0.0)


def test_separated_means_non_overlapping_intervals():
  assert study.separated((1.0, 0.1, 3), (1.25, 0.1, 3))
  assert study.separated((1.25, 0.1, 3), (1.0, 0.1, 3))
  assert not study.separated((1.0, 0.1, 3), (1.15, 0.1, 3))
  assert not study.separated((1.0, 0.125, 3), (1.25, 0.125, 3))   # touching: not larger than the spread
  assert not study.separated((1.0, float("inf"), 1), (5.0, 0.0, 3))


def _records(values: dict, group: str = "") -> list:
  return [dict(block="t", seed=s, group=group, arm=arm, title=arm.upper(), acc=v, settings={})
          for arm, vs in values.items() for s, v in enumerate(vs)]


def test_table_marks_only_differences_beyond_the_seed_spread():
  block = study.Block("t", "T", run=None, settings={}, quick={}, metrics=(study.Metric("acc", "acc"),),
                      reference="ref", describe=lambda st: "toy.")
  recs = _records({"ref": [0.50, 0.52, 0.48], "far": [0.80, 0.81, 0.79], "near": [0.50, 0.60, 0.40]})
  md = study.table(recs, block)
  rows = {l.split(" | ")[0].strip("| "): l for l in md.splitlines() if l.startswith("| ")}
  assert "larger than seed spread" in rows["FAR (`far`)"] and "+0.300" in rows["FAR (`far`)"]
  assert "within spread" in rows["NEAR (`near`)"]
  assert "reference" in rows["REF (`ref`)"]
  h = 4.302652729749463 * np.std([0.80, 0.81, 0.79], ddof=1) / math.sqrt(3)
  assert f"0.800 ± {h:.3f}" in rows["FAR (`far`)"]
  assert "acc, seed 0 | acc, seed 1 | acc, seed 2" in md
  assert "Larger than the seed spread: FAR: +0.300." in md


def test_tempbalance_tuned_baseline_is_the_best_mean_lr_per_group():
  recs = (_records({"lr_x1": [0.5, 0.6, 0.7], "lr_x2": [0.7, 0.7, 0.7], "tb": [0.9, 0.9, 0.9]}, "n 250")
          + _records({"lr_x1": [0.3, 0.3, 0.3], "lr_x2": [0.1, 0.2, 0.3]}, "n 1000"))
  for r in recs:
    r["exact_match"] = r.pop("acc")
  tuned = study._tempbalance_tuned(recs)
  by_group = {g: sorted(r["exact_match"] for r in tuned if r["group"] == g) for g in ("n 250", "n 1000")}
  assert by_group == {"n 250": [0.7, 0.7, 0.7], "n 1000": [0.3, 0.3, 0.3]}
  assert {r["arm"] for r in tuned} == {"tuned"}


def test_replace_marked_changes_only_the_span(tmp_path):
  readme = tmp_path / "README.md"
  shutil.copy(os.path.join(ROOT, "README.md"), readme)
  text = readme.read_text()
  start, end = "<!-- study:preference -->", "<!-- /study:preference -->"
  assert start in text and end in text
  new = study.replace_marked(text, "preference", "| new | table |")
  i, j = text.index(start), text.index(end)
  assert new.startswith(text[:i + len(start)]) and new.endswith(text[j:])
  assert new[i + len(start):new.index(end)] == "\n| new | table |\n"
  assert study.replace_marked(new, "preference", "| new | table |") == new     # idempotent
  with pytest.raises(ValueError, match="study:nope"):
    study.replace_marked(text, "nope", "x")


def test_pipeline_jsonl_tables_readme_and_resume(tmp_path, monkeypatch):
  """The run -> JSONL -> table -> README path with a stub block (no training): seeds are appended per seed,
  the table step alone reproduces the markdown, and a rerun skips finished seeds."""
  calls = []

  def run(seed, st, wd, emit):
    calls.append(seed)
    for arm, v in (("ref", 0.5 + 0.01 * seed), ("up", 0.9 + 0.01 * seed)):
      emit(dict(arm=arm, title=arm.upper(), acc=v * st["scale"]))

  block = study.Block("toy", "Toy", run, settings=dict(scale=1.0), quick=dict(scale=1.0),
                      metrics=(study.Metric("acc", "acc"),), reference="ref", describe=lambda st: "toy.")
  monkeypatch.setitem(study.BLOCKS, "toy", block)
  out, readme = tmp_path / "out", tmp_path / "README.md"
  readme.write_text("before\n<!-- study:toy -->\nold\n<!-- /study:toy -->\nafter\n")
  argv = ["--blocks=toy", "--seeds=3", f"--out={out}", f"--workroot={tmp_path / 'w'}", f"--update-readme={readme}"]
  study.main(argv)
  assert calls == [0, 1, 2]
  recs = [json.loads(l) for l in open(out / "toy.jsonl")]
  assert [(r["seed"], r["arm"]) for r in recs] == [(s, a) for s in range(3) for a in ("ref", "up")]
  md = (out / "toy.md").read_text()
  m, h, _ = study.mean_ci([0.9, 0.91, 0.92])
  assert f"| UP (`up`) | {m:.3f} ± {h:.3f} | 0.900 | 0.910 | 0.920 | +0.400 **larger than seed spread** |" in md
  text = readme.read_text()
  assert text.startswith("before\n<!-- study:toy -->\n") and text.endswith("<!-- /study:toy -->\nafter\n")
  assert "old" not in text and "acc, seed 2" in text
  (out / "toy.md").unlink()
  study.main(["--blocks=toy", f"--out={out}", "--tables_only"])
  assert (out / "toy.md").read_text() == md
  study.main(argv[:1] + ["--seeds=4"] + argv[2:])            # one more seed: only seed 3 trains
  assert calls == [0, 1, 2, 3]
  assert len([json.loads(l) for l in open(out / "toy.jsonl")]) == 8


@pytest.mark.slow
def test_quick_block_end_to_end(tmp_path):
  """--quick on the preference block (tiny model, 8 steps, 2 seeds, DPO only); about 40 s of CPU."""
  out, readme = tmp_path / "out", tmp_path / "README.md"
  readme.write_text("# R\n\nprose before\n<!-- study:preference -->\nold table\n<!-- /study:preference -->\n"
                    "prose after\n")
  argv = ["--blocks=preference", "--quick", "--seeds=2", "--arms=dpo", f"--out={out}",
          f"--workroot={tmp_path / 'work'}", f"--update-readme={readme}"]
  study.main(argv)
  recs = [json.loads(l) for l in open(out / "preference.jsonl")]
  assert sorted((r["seed"], r["arm"]) for r in recs) == [(0, "dpo"), (0, "sft"), (1, "dpo"), (1, "sft")]
  assert all(r["complete"] and r["settings"]["smoke"] for r in recs)
  md = (out / "preference.md").read_text()
  assert "held-out exact match, seed 0 | held-out exact match, seed 1" in md
  dpo = [r["exact_match"] for r in recs if r["arm"] == "dpo"]
  m, h, _ = study.mean_ci(dpo)
  assert f"| DPO (sigmoid) (`dpo`) | {m:.3f} ± {h:.3f} |" in md
  text = readme.read_text()
  assert "old table" not in text and "prose before" in text and "prose after" in text
  assert "held-out exact match, seed 1" in text
  # The table step alone, from the JSONL: the same markdown; a rerun of finished seeds trains nothing.
  (out / "preference.md").unlink()
  study.main(argv[:1] + [f"--out={out}", "--tables_only"])
  assert (out / "preference.md").read_text() == md
  study.main(argv)
  assert [json.loads(l) for l in open(out / "preference.jsonl")] == recs


def test_tempbalance_baseline_arms_have_tempbalance_off():
  """The study's lr-grid baselines run lowdata_tempbalance's `off_lr_up` arm: f = 1, only the lr scaled."""
  from benchmarks import lowdata_tempbalance as lt
  args = lt.parse_args(["--model=tiny", "--lr_up=2.0", "--steps=10"])
  off = lt.config_for(args, 250, "off", 0)
  up = lt.config_for(args, 250, "off_lr_up", 0)
  tb = lt.config_for(args, 250, "tb", 0)
  assert not off.tempbalance.enabled and not up.tempbalance.enabled and tb.tempbalance.enabled
  assert up.optim.learning_rate == 2.0 * off.optim.learning_rate == 2.0 * tb.optim.learning_rate


def test_paired_interval_is_the_interval_of_the_per_seed_differences():
  """Arms of one seed share its base: the paired interval is mean ± t_(0.975, n-1) s / sqrt(n) of the
  differences over the seeds both arms have (t_(0.975, 2) = 4.302653 for 3 seeds)."""
  arm = {0: 0.50, 1: 0.40, 2: 0.70, 3: None}
  ref = {0: 0.45, 1: 0.36, 2: 0.62, 4: 0.1}
  m, h, n = study.paired_ci(arm, ref)
  d = np.array([0.05, 0.04, 0.08])
  assert n == 3
  np.testing.assert_allclose(m, d.mean(), rtol=1e-12)
  np.testing.assert_allclose(h, 4.302653 * d.std(ddof=1) / np.sqrt(3), rtol=1e-6)
  # the unpaired intervals of these arms overlap, the paired one excludes 0
  assert not study.separated(study.mean_ci([0.5, 0.4, 0.7]), study.mean_ci([0.45, 0.36, 0.62]))
  assert abs(m) > h
