r"""The study: every results table of the README, from the built-in tasks, with several seeds and error bars.

    nice -n 10 python -m benchmarks.study                                   # every block, 3 seeds
    python -m benchmarks.study --blocks=preference,tempbalance --seeds=3
    python -m benchmarks.study --blocks=preference --tables_only --update-readme   # re-aggregate, no training
    python -m benchmarks.study --blocks=preference --quick --seeds=2 --out=OUT_DIR  # a smoke test

Blocks (each reuses the logic of the benchmark script named):

  preference           DPO, IPO, SimPO, LiPO-lambda, DPO-Kernels (`dpo_compatible` and `faithful`) with LoRA
                       from one SFT model per seed (benchmarks/preference_table.py)
  adapters_optimizers  full fine-tuning, LoRA, DoRA, PiSSA, GaLore, Fira, LISA, OwLore: a base trained on
                       `sort` fine-tuned on `reverse` (benchmarks/optimizer_table.py)
  tempbalance          TempBalance on / off across training-set sizes, against the baseline at the best of
                       a learning-rate grid (x1, x2) (benchmarks/lowdata_tempbalance.py); writes a plot too
  owlore_sampling      OwLore's block sampling by outlier ratio, by 1/alpha and uniform (configs/owlore.py)
  merging              averaging, task arithmetic, TIES, DARE of two fine-tunes (benchmarks/merge_table.py)

A seed sets everything random in a run: the model initialisation (of the base / SFT model too: each seed
trains its own), the data order, adapter initialisation and random merge masks. The training problems
themselves are the task's (the same for every seed). Every seed's raw results are appended to
`<out>/<block>.jsonl` as soon as that seed finishes (a rerun skips seeds already there with the same
settings), and the tables `<out>/<block>.md` are aggregated from those files alone (`--tables_only`).

Statistics (`mean_ci`): the mean over n seeds +- the half-width of the two-sided 95% Student-t interval,
t_{0.975, n-1} s / sqrt(n), with s the sample standard deviation (ddof 1). A difference between two rows
is called larger than the seed spread (`separated`) when their two intervals do not overlap,
|m_a - m_b| > h_a + h_b: a conservative rule (non-overlapping 95% intervals imply p < 0.05 and more).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------
def mean_ci(xs, confidence: float = CONFIDENCE) -> tuple[float, float, int]:
  """(mean, half-width of the two-sided Student-t interval, n) of the finite values of `xs`.

  h = t_{(1 + confidence) / 2, n - 1} s / sqrt(n), s the sample standard deviation (ddof 1); h = inf for
  n = 1 (no spread can be estimated), (nan, nan, 0) for no values.
  """
  from scipy import stats   # pylint: disable=g-import-not-at-top
  x = np.asarray([v for v in xs if v is not None and math.isfinite(v)], np.float64)
  n = len(x)
  if n == 0:
    return float("nan"), float("nan"), 0
  if n == 1:
    return float(x[0]), float("inf"), 1
  t = stats.t.ppf((1 + confidence) / 2, n - 1)
  return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(n)), n


def paired_ci(per_seed: dict, ref_seed: dict) -> tuple[float, float, int]:
  """`mean_ci` of the per-seed differences per_seed[s] - ref_seed[s] over the seeds both have: arms of one
  seed share that seed's base model and data order, so their difference varies less than either arm."""
  return mean_ci(per_seed[s] - ref_seed[s] for s in per_seed
                 if s in ref_seed and per_seed[s] is not None and ref_seed[s] is not None)


def separated(a: tuple, b: tuple) -> bool:
  """Whether two (mean, half-width, ...) intervals do not overlap: |m_a - m_b| > h_a + h_b."""
  return bool(abs(a[0] - b[0]) > a[1] + b[1])


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------
class Metric(NamedTuple):
  key: str
  label: str
  fmt: str = ".3f"
  scale: float = 1.0        # shown value = raw * scale (bytes -> KiB)


class Block(NamedTuple):
  name: str
  title: str
  run: Callable             # (seed, settings, workdir, emit(record)) -> None
  settings: dict            # the full study's sizes
  quick: dict               # the seconds-long smoke settings
  metrics: tuple            # Metric, the first one is the headline (seed columns, comparisons)
  reference: str            # the arm every other arm of a group is compared with
  describe: Callable        # settings -> one paragraph of setup
  derive: Callable | None = None   # records of one seed -> extra records (e.g. the tuned baseline)


def _preference_run(seed, st, wd, emit):
  from benchmarks import preference_table as pt   # pylint: disable=g-import-not-at-top
  runs = [r for r in pt.RUNS if _arm_id(r[0]) in st["only"]] if st.get("only") else pt.RUNS
  sft, rows = pt.run_seed(wd, st["model"], st["sft_steps"], st["steps"], seed, runs=runs, smoke=st["smoke"],
                          eval_before=False, num_examples=st["num_examples"])
  emit(dict(arm="sft", title="SFT model (start of every run)", exact_match=float(sft["after"]["exact_match"])))
  for title, _, after in rows:
    emit(dict(arm=_arm_id(title), title=title, **after))


def _arm_id(title: str) -> str:
  ids = {"DPO (sigmoid)": "dpo", "IPO": "ipo", "SimPO": "simpo", "LiPO-lambda (K=4)": "lipo",
         "DPO-Kernels (rbf, KL, dpo_compatible)": "dpok_rbf_kl", "DPO-Kernels (HMK, JS, dpo_compatible)":
         "dpok_hmk_js", "DPO-Kernels (rbf, KL, faithful)": "dpok_faithful"}
  return ids.get(title, re.sub(r"\W+", "_", title.lower()).strip("_"))


ADAPTER_RUNS = (
    ("full", "full fine-tuning (AdamW)", "lora.py", "adapter=none", {}),
    ("lora", "LoRA r16", "lora.py", "adapter=lora", {}),
    ("dora", "DoRA r16", "lora.py", "adapter=dora", {}),
    ("pissa", "LoRA r16, PiSSA init", "lora.py", "adapter=lora,init=pissa", {}),
    ("galore", "GaLore r32", "galore.py", "opt=galore,rank=32", {}),
    ("fira", "Fira r32", "galore.py", "opt=fira,rank=32", {}),
    ("lisa", "LISA (gamma 1 of 2)", "lisa.py", "gamma=1", {}),
    ("owlore", "OwLore (gamma 1 of 2, GaLore r32)", "owlore.py", "gamma=1,rank=32", {}),
)


def _calibration(st):
  """OwLore's calibration set at the built-in task's size (OWL's 128 x 2048 tokens is for C4)."""
  return {"sampling.calibration_sequences": 32, "sampling.calibration_seq_len": 32} if not st["smoke"] else {}


def _transfer_run(runs):
  def run(seed, st, wd, emit):
    from benchmarks import optimizer_table as ot   # pylint: disable=g-import-not-at-top
    from benchmarks._common import train_base   # pylint: disable=g-import-not-at-top
    base = train_base(wd, st["model"], st["base_steps"], seed=seed, smoke=st["smoke"])
    for arm, title, cfg_file, arg, over in runs:
      if st.get("only") and arm not in st["only"]:
        continue
      over = {**over, **(_calibration(st) if cfg_file == "owlore.py" else {}),
              "log_every_steps": st["log_every"], "optim.warmup_steps": st["warmup"]}
      r = ot.run_method(cfg_file, arg, base, os.path.join(wd, arm), model=st["model"], steps=st["steps"],
                        seed=seed, smoke=st["smoke"], overrides=over)
      emit(dict(arm=arm, title=title, **r))
  return run


OWLORE_RUNS = (
    ("uniform", "uniform (p = 1/L)", "owlore.py", "gamma=1,rank=32", {"sampling.prob_mode": "uniform"}),
    ("outlier", "outlier ratio (OwLore: p ∝ D_l)", "owlore.py", "gamma=1,rank=32", {}),
    ("alpha", "HT-SR alpha (p ∝ 1/alpha_l)", "owlore.py", "method=owlore_alpha,gamma=1,rank=32",
     {"sampling.eigs_thresh": 16}),
)


def _tempbalance_run(seed, st, wd, emit):
  from benchmarks import lowdata_tempbalance as lt   # pylint: disable=g-import-not-at-top
  for size in st["sizes"]:
    for arm, lr in st["arms"]:
      if st.get("only") and arm not in st["only"]:
        continue
      args = lt.parse_args([f"--model={st['model']}", f"--task={st['task']}", f"--steps={st['steps']}",
                            f"--lr_up={lr}"])
      if st["smoke"]:
        args.steps = 4
      r = lt.run_one(args, size, "tb" if arm == "tb" else "off_lr_up", seed, os.path.join(wd, arm))
      emit(dict(group=f"train_size {size}", arm=arm, title=_TB_TITLES.get(arm, arm), exact_match=r["exact_match"],
                loss=r["loss"], seconds=r["seconds"]))


_TB_TITLES = {"tb": "TempBalance (lr x 1)", "lr_x0.5": "baseline, lr x 0.5", "lr_x1": "baseline, lr x 1",
              "lr_x2": "baseline, lr x 2", "tuned": "baseline, best of the lr grid"}


def _tempbalance_tuned(records):
  """The tuned baseline of each group: the baseline lr whose mean held-out exact match over the seeds is
  highest (chosen on the reported set: a selection that favours the baseline, never TempBalance)."""
  out = []
  for group in dict.fromkeys(r.get("group", "") for r in records):
    sel = [r for r in records if r.get("group", "") == group and r["arm"].startswith("lr_x")]
    if not sel:
      continue
    arms = sorted({r["arm"] for r in sel})
    best = max(arms, key=lambda a: mean_ci(r["exact_match"] for r in sel if r["arm"] == a)[0])
    out += [dict(r, arm="tuned", title=f"baseline, best of the lr grid ({best[3:]})") for r in sel
            if r["arm"] == best]
  return out


# (arm, row title of merge_table.methods()): averaging is the reference; TIES and DARE at lambda 1 (mergekit's
# default) and at lambda 0.5 (the scale averaging gives each of two task vectors).
_MERGE_ROWS = (("linear", "linear (uniform soup)"), ("task_arithmetic", "task arithmetic, lambda 1"),
               ("ties_l1", "TIES, density 0.5"), ("ties", "TIES, density 0.5, lambda 0.5"),
               ("ties_d02", "TIES, density 0.2, lambda 0.5"), ("dare_linear", "DARE linear, density 0.5, lambda 0.5"),
               ("dare_ties", "DARE TIES, density 0.5, lambda 0.5"))


def _merging_run(seed, st, wd, emit):
  from benchmarks import merge_table as mt   # pylint: disable=g-import-not-at-top
  by_title = {m[0]: m for m in mt.methods()}
  table = [by_title[title] for _, title in st["rows"]]
  base_dir, ft_dirs = mt.fine_tunes(wd, st["model"], st["base_steps"], st["steps"], st["lr"], seed,
                                    smoke=st["smoke"], base_tasks=st["base_tasks"])
  rows = mt.score_merges(base_dir, ft_dirs, st["model"], st["num_examples"], seed=seed, table=table)
  ids = ["base", "ft_sort", "ft_reverse"] + [arm for arm, _ in st["rows"]]
  for arm, (title, (s, r)) in zip(ids, rows):
    emit(dict(arm=arm, title=title, sort=s, reverse=r, mean=(s + r) / 2))


_EM = Metric("exact_match", "held-out exact match")


BLOCKS = {b.name: b for b in (
    Block("preference", "Preference tuning", _preference_run,
          settings=dict(model="tiny", sft_steps=150, steps=60, num_examples=100, smoke=False),
          quick=dict(model="tiny", sft_steps=8, steps=8, num_examples=0, smoke=True),
          metrics=(_EM, Metric("ranking_accuracy", "ranking acc."),
                   Metric("rewards/accuracies", "rewards/accuracies")),
          reference="dpo",
          describe=lambda st: (
              f"A `{st['model']}` model is trained by SFT on `sort` ({st['sft_steps']} steps), then each run "
              f"trains LoRA r16 on all linear layers for {st['steps']} steps of preference pairs (lists of 4 "
              "for LiPO) from it, the reference = the SFT weights (`benchmarks/preference_table.py`, "
              "`configs/dpo.py`, `lipo.py`, `dpo_kernels.py`; DPO-Kernels' `faithful` row is the reference "
              "code's objective with embeddings from the frozen reference model (`source=reference_hidden`; "
              "the paper's are a frozen encoder's), `dpo_compatible` is ours, with the policy's own embeddings; "
              "both at our defaults gamma 0.1, alpha 0.1, RBF sigma 4). Held-out exact match: greedy generations of "
              f"{st['num_examples'] or 'the config'} prompts, checked by the verifier; ranking accuracy: "
              "held-out pairs whose log-prob order matches the preference; "
              "`rewards/accuracies`: TRL's implicit-reward accuracy (SimPO: of its own length-normalised reward, no "
              "reference).")),
    Block("adapters_optimizers", "Adapters and memory-efficient optimizers", _transfer_run(ADAPTER_RUNS),
          settings=dict(model="tiny", base_steps=300, steps=150, log_every=10, warmup=15, smoke=False),
          quick=dict(model="tiny", base_steps=8, steps=8, log_every=2, warmup=2, smoke=True),
          metrics=(_EM, Metric("opt_state_bytes", "optimizer state (KiB)", ".1f", 1 / 1024),
                   Metric("step_ms", "step (ms)", ".1f")),
          reference="full",
          describe=lambda st: (
              f"A `{st['model']}` model trained on `sort` ({st['base_steps']} steps) is fine-tuned on "
              f"`reverse` for {st['steps']} steps by each method's config (`benchmarks/optimizer_table.py`; "
              "lr 1e-3 for full fine-tuning, 3e-3 otherwise, as the configs set). Optimizer state: bytes of the "
              "train state's optimizer tree (float32). Step: median over logging windows of a shared 2-core "
              "CPU (loaded by other jobs; includes host work such as layer resampling).")),
    Block("tempbalance", "TempBalance in low data", _tempbalance_run,
          settings=dict(model="tiny", task="sort", steps=100, sizes=(250, 1000, 4000),
                        arms=(("lr_x1", 1.0), ("lr_x2", 2.0), ("tb", 1.0)), smoke=False),
          quick=dict(model="tiny", task="sort", steps=4, sizes=(250,), arms=(("lr_x1", 1.0), ("tb", 1.0)),
                     smoke=True),
          metrics=(_EM, Metric("loss", "held-out loss", ".4f")),
          reference="tuned",
          derive=_tempbalance_tuned,
          describe=lambda st: (
              f"`configs/tempbalance.py` on `{st['task']}` (model `{st['model']}`, {st['steps']} steps of "
              "batch 32, AdamW peak lr 3e-3, cosine) at each training-set size, with TempBalance "
              "(`tb_linear_map`, f in [0.5, 1.5]) and without it at peak lr x 1 and x 2 "
              "(`benchmarks/lowdata_tempbalance.py`). The tuned baseline is the baseline lr with the best "
              "mean exact match at that size, chosen on the same held-out set (this favours the baseline). "
              "Held-out: 256 problems in no training set (greedy exact match), 4 x 64 for the loss.")),
    Block("owlore_sampling", "OwLore: which blocks to sample", _transfer_run(OWLORE_RUNS),
          settings=dict(model="tiny", base_steps=300, steps=150, log_every=10, warmup=15, smoke=False),
          quick=dict(model="tiny", base_steps=8, steps=8, log_every=2, warmup=2, smoke=True),
          metrics=(_EM, Metric("loss", "held-out loss", ".4f")),
          reference="uniform",
          describe=lambda st: (
              f"A `{st['model']}` model trained on `sort` ({st['base_steps']} steps) is fine-tuned on "
              f"`reverse` for {st['steps']} steps by `configs/owlore.py` (1 of the model's "
              f"{ {'tiny': 2, 'small': 4}.get(st['model'], '') } blocks sampled every 50 steps, "
              "GaLore r32 in it, AdamW elsewhere), with the sampling probabilities of `optim/_sampling.py`: "
              "uniform, OwLore's outlier ratios (OWL, M = 13; calibration on 32 training rows of 32 tokens), "
              "or 1/alpha of the block's weights (HT-SR, `method=owlore_alpha`, `eigs_thresh` 16).")),
    Block("merging", "Merging two fine-tunes", _merging_run,
          settings=dict(model="small", base_tasks="add,sort,reverse", base_steps=150, steps=200, lr=1e-3,
                        num_examples=100, rows=_MERGE_ROWS, smoke=False),
          quick=dict(model="tiny", base_tasks="add,sort,reverse", base_steps=8, steps=8, lr=3e-3,
                     num_examples=8, rows=_MERGE_ROWS[:1] + _MERGE_ROWS[3:4], smoke=True),
          metrics=(Metric("mean", "mean of the two tasks"), Metric("sort", "sort"), Metric("reverse", "reverse")),
          reference="linear",
          describe=lambda st: (
              f"A `{st['model']}` model trained on an even mixture of {st['base_tasks']} ({st['base_steps']} "
              f"steps: it knows both targets a little) is fine-tuned twice (full, {st['steps']} steps, lr "
              f"{st['lr']:g}), on `sort` and on `reverse`; the fine-tunes are merged by each method with task "
              "vectors relative to the base, weights 1 (`benchmarks/merge_table.py`). Averaging is task "
              "arithmetic at lambda 0.5. Exact match on "
              f"{st['num_examples']} held-out prompts "
              "of each task.")),
)}


# ---------------------------------------------------------------------------------------------------
# Running: one JSONL line per (seed, arm), appended as each run finishes
# ---------------------------------------------------------------------------------------------------
def _jsonable(settings: dict) -> dict:
  return json.loads(json.dumps(settings))


def read_records(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path) if l.strip()]


def run_block(block: Block, seeds, settings: dict, out: str, workroot: str) -> float:
  """Trains the seeds of `block` not yet in `<out>/<block>.jsonl` with these settings; returns seconds."""
  import jax   # pylint: disable=g-import-not-at-top
  path = os.path.join(out, f"{block.name}.jsonl")
  st = _jsonable(settings)
  old = read_records(path)
  keep = [r for r in old if r["settings"] == st]
  if len(keep) != len(old):   # other settings: the file describes one configuration
    print(f"[study] {block.name}: settings changed, dropping {len(old) - len(keep)} earlier records", flush=True)
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
  t_block = time.perf_counter()
  for seed in seeds:
    if seed in {r["seed"] for r in read_records(path) if r.get("complete") and r["settings"] == st}:
      print(f"[study] {block.name}: seed {seed} already in {path}", flush=True)
      continue
    pending = []
    t0 = time.perf_counter()
    block.run(seed, st, os.path.join(workroot, block.name, f"seed{seed}"),
              lambda rec: pending.append(dict(block=block.name, seed=seed, group=rec.pop("group", ""), **rec)))
    secs = time.perf_counter() - t0
    keep = [r for r in read_records(path) if r["seed"] != seed]   # a half-written seed is replaced
    with open(path, "w") as f:
      for r in keep + [dict(r, settings=st, seed_seconds=secs, complete=True, backend=jax.default_backend())
                       for r in pending]:
        f.write(json.dumps(r) + "\n")
    print(f"[study] {block.name}: seed {seed} done in {secs:.0f} s", flush=True)
  return time.perf_counter() - t_block


# ---------------------------------------------------------------------------------------------------
# Tables: from the JSONL alone
# ---------------------------------------------------------------------------------------------------
def _fmt(m: tuple, metric: Metric) -> str:
  mean, h, n = m
  if n == 0:
    return "-"
  s = f"{mean * metric.scale:{metric.fmt}}"
  return s + (f" ± {h * metric.scale:{metric.fmt}}" if math.isfinite(h) else " (1 seed)")


def aggregate(records: list[dict], block: Block):
  """[(group, arm, title, {metric key: (mean, h, n)}, {seed: headline value})] in first-seen order."""
  if block.derive:
    records = records + block.derive(records)
  keys = list(dict.fromkeys((r.get("group", ""), r["arm"]) for r in records))
  groups = list(dict.fromkeys(g for g, _ in keys))
  keys.sort(key=lambda k: groups.index(k[0]))          # stable: a group's derived rows follow its own
  rows = []
  for g, a in keys:
    sel = [r for r in records if (r.get("group", ""), r["arm"]) == (g, a)]
    stats = {m.key: mean_ci(r.get(m.key) for r in sel) for m in block.metrics}
    rows.append((g, a, sel[-1]["title"], stats, {r["seed"]: r.get(block.metrics[0].key) for r in sel}))
  return rows


def table(records: list[dict], block: Block) -> str:
  """The block's markdown: setup, the table (mean ± 95% t half-width; seed columns of the headline metric;
  which rows differ from the reference by more than the seed spread), the rule, and the run time."""
  rows = aggregate(records, block)
  seeds = sorted({r["seed"] for r in records})
  head = block.metrics[0]
  has_group = any(g for g, *_ in rows)
  ref_stats = {g: s for g, a, _, s, _ in rows if a == block.reference}
  ref_seed = {g: ps for g, a, _, _, ps in rows if a == block.reference}
  cols = (["group"] if has_group else []) + ["run"] + [m.label for m in block.metrics] + \
      [f"{head.label}, seed {s}" for s in seeds] + [f"vs `{block.reference}`", "paired, same seed"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  verdicts, paired_verdicts = [], []
  for g, a, title, stats, per_seed in rows:
    ref = ref_stats.get(g, {}).get(head.key)
    if a == block.reference or ref is None or stats[head.key][2] == 0:
      verdict = "reference" if a == block.reference else "-"
    else:
      sep = separated(stats[head.key], ref)
      diff = (stats[head.key][0] - ref[0]) * head.scale
      spread = "" if min(stats[head.key][2], ref[2]) >= 2 else " (one seed: no spread)"
      verdict = f"{diff:+{head.fmt}}" + (" **larger than seed spread**" if sep else spread or " (within spread)")
      if sep:
        verdicts.append(f"{title}{' at ' + g if g else ''}: {diff:+{head.fmt}}")
    cells = ([g] if has_group else []) + [f"{title} (`{a}`)"] + [_fmt(stats[m.key], m) for m in block.metrics]
    cells += [("-" if per_seed.get(s) is None else f"{per_seed[s] * head.scale:{head.fmt}}") for s in seeds]
    paired = "-"
    if a != block.reference and g in ref_seed:
      pm, ph, pn = paired_ci(per_seed, ref_seed[g])
      if pn >= 2:
        paired = f"{pm * head.scale:+{head.fmt}} ± {ph * head.scale:{head.fmt}}" + (
            " **excludes 0**" if abs(pm) > ph else "")
        if abs(pm) > ph:
          paired_verdicts.append(f"{title}{' at ' + g if g else ''}: {pm * head.scale:+{head.fmt}}")
    lines.append("| " + " | ".join(cells + [verdict, paired]) + " |")
  st = records[0]["settings"]
  secs = {}
  for r in records:
    secs[r["seed"]] = r.get("seed_seconds", float("nan"))
  total = sum(secs.values())
  n = len(seeds)
  return "\n".join([
      f"Setup: {block.describe(st)} Seeds {seeds}.",
      "",
      *lines,
      "",
      f"Cells: mean ± half-width of the 95% Student-t interval over the {n} seeds, t_(0.975, n-1) s / sqrt(n) "
      f"(s: sample standard deviation). Last column: difference from `{block.reference}` in the same group, "
      f"in the seed mean of {head.label}; **larger than seed spread** when the two 95% intervals do not overlap "
      "(|m_a - m_b| > h_a + h_b), otherwise within spread. "
      + (f"Larger than the seed spread: {'; '.join(verdicts)}." if verdicts else
         "No difference from the reference is larger than the seed spread.")
      + " Paired column: mean ± 95% t half-width of the per-seed differences from the reference (arms of one "
      "seed share its base model and data order), **excludes 0** when the interval does; "
      + (f"it does for: {'; '.join(paired_verdicts)}." if paired_verdicts else "it does for no row."),
      "",
      f"Run time: {total / 60:.1f} min, the sum of the {n} seeds' wall times ({records[0].get('backend', 'cpu')}, "
      "a 2-core CPU shared with other jobs). "
      f"Command: `python -m benchmarks.study --blocks={block.name} --seeds={n}`; raw per-seed results: "
      f"`{block.name}.jsonl`.",
  ])


def plot_tempbalance(records: list[dict], block: Block, path: str):
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  rows = aggregate(records, block)
  fig, axes = plt.subplots(1, len(block.metrics), figsize=(5 * len(block.metrics), 3.8))
  arms = list(dict.fromkeys(a for _, a, *_ in rows))
  for k, arm in enumerate(arms):
    sel = [(int(g.split()[-1]), s) for g, a, _, s, _ in rows if a == arm]
    for ax, m in zip(axes, block.metrics):
      xs = [x * (1 + 0.03 * (k - len(arms) / 2)) for x, _ in sel]     # dodge the error bars
      ax.errorbar(xs, [s[m.key][0] for _, s in sel], yerr=[s[m.key][1] for _, s in sel], marker="o",
                  capsize=3, label=_TB_TITLES.get(arm, arm))
  sizes = sorted({int(g.split()[-1]) for g, *_ in rows})
  for ax, m in zip(axes, block.metrics):
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(x) for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training problems (train_size)")
    ax.set_title(f"{m.label} (mean ± 95% t-interval)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_tables(block: Block, out: str) -> str | None:
  records = read_records(os.path.join(out, f"{block.name}.jsonl"))
  if not records:
    return None
  md = table(records, block)
  with open(os.path.join(out, f"{block.name}.md"), "w") as f:
    f.write(f"# {block.title}\n\n{md}\n")
  if block.name == "tempbalance":
    plot_tempbalance(records, block, os.path.join(out, "tempbalance.png"))
  return md


def replace_marked(text: str, name: str, body: str) -> str:
  """`text` with the span between `<!-- study:name -->` and `<!-- /study:name -->` replaced by `body`."""
  start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
  i, j = text.find(start), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"README has no {start} ... {end} span")
  return text[:i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated, of {', '.join(BLOCKS)}")
  p.add_argument("--seeds", type=int, default=3, help="seeds seed_start .. seed_start + n - 1")
  p.add_argument("--seed_start", type=int, default=0, help="first seed (to run seeds in parallel processes)")
  p.add_argument("--quick", action="store_true", help="seconds-long runs (the smoke test)")
  p.add_argument("--arms", default="", help="only these arms (ids as in the tables' backticks)")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "study"))
  p.add_argument("--workroot", default="", help="run workdirs (default: <out>/work, not committed)")
  p.add_argument("--tables_only", action="store_true", help="aggregate the JSONL files; no training")
  p.add_argument("--update-readme", "--update_readme", dest="update_readme", nargs="?", const="README.md",
                 default=None, help="replace the <!-- study:BLOCK --> spans of this README")
  a = p.parse_args(argv)
  names = a.blocks.split(",")
  for n in names:
    if n not in BLOCKS:
      raise ValueError(f"--blocks: {n!r}; valid: {', '.join(BLOCKS)}")
  os.makedirs(a.out, exist_ok=True)
  workroot = a.workroot or os.path.join(a.out, "work")
  if not a.tables_only:
    import jax   # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", os.path.join(workroot, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  readme = os.path.join(ROOT, a.update_readme) if a.update_readme and not os.path.isabs(a.update_readme) \
      else a.update_readme
  for n in names:
    block = BLOCKS[n]
    if not a.tables_only:
      st = dict(block.quick if a.quick else block.settings)
      if a.arms:
        st["only"] = a.arms.split(",")
      secs = run_block(block, range(a.seed_start, a.seed_start + a.seeds), st, a.out, workroot)
      print(f"[study] {n}: {secs / 60:.1f} min", flush=True)
    md = write_tables(block, a.out)
    if md is None:
      print(f"[study] {n}: no results in {a.out}", flush=True)
      continue
    print(f"## {block.title}\n\n{md}\n", flush=True)
    if readme:
      text = open(readme).read()
      rel = os.path.relpath(os.path.join(a.out, f"{n}.md"), os.path.dirname(os.path.abspath(readme)))
      try:
        text = replace_marked(text, n, f"{md}\n\nTable file: [{rel}]({rel}).")
      except ValueError as e:   # a block whose README section is still hand-written: say so, go on
        print(f"[study] {n}: README not updated: {e}", flush=True)
        continue
      with open(readme, "w") as f:
        f.write(text)


if __name__ == "__main__":
  main()
