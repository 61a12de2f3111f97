r"""The `diagnose` task: HT-SR alphas of every weight matrix of a checkpoint, as tables and plots.

    python main.py --config=configs/diagnose.py --config.checkpoint=PATH --workdir=OUT

PATH is a Hugging Face model directory (config.json + safetensors) or the workdir of a project training
run (config.json with `task: train` + checkpoints/; adapters included, see `esd_type`). OUT receives

    alphas.csv, alphas.json      one row per matrix and per slice of a stacked kernel (diagnostics.COLUMNS);
                                 the JSON adds the estimator config, the block means and the source
    alpha_per_layer.png          alpha per decoder block, one line per projection type
    esd_<layer>_<name>.png       the ESD of chosen matrices on log-log axes with the fitted tail

and a short table is printed. The fit is `diagnostics.analyze` with an `EsdConfig` preset (`esd_preset`)
and the overrides of the config; alphas from different xmin rules are not comparable (METHODS.md A1), so
the JSON records the whole estimator config.

`esd_type='cul'` analyses W_t - W_0 against `init_checkpoint` (another HF directory or workdir); for a
workdir it defaults to the run's own starting weights (its `hf_path` base, or its seeded init).
"""
from __future__ import annotations

import json
import os
from typing import Any

import diagnostics
import models
import data as data_lib
from train_lib import build

ESD_PRESETS = diagnostics.ESD_PRESETS


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def checkpoint_kind(path: str) -> str:
  """'workdir' (a project training run) or 'hf' (a Hugging Face model directory); raises otherwise."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{path!r} has no config.json: expected a Hugging Face model directory "
                            "or the workdir of a training run")
  with open(cfg_file) as f:
    cfg = json.load(f)
  if cfg.get("task") == "train" or os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if any(n.endswith(".safetensors") for n in os.listdir(path)):
    return "hf"
  raise FileNotFoundError(f"{path!r}: config.json is neither a training run's (task: train, checkpoints/) "
                          "nor beside safetensors files")


def load_params(path: str, step: int = 0) -> tuple[Any, Any, str]:
  """(params, DecoderConfig, kind) of an HF directory or of a workdir at `step` (0: latest)."""
  kind = checkpoint_kind(path)
  if kind == "hf":
    cfg, params = models.load_hf(path)
    return params, cfg, kind
  _, model, params, _ = build.load_trained(path, step or None)
  return params, model.config, kind


def initial_params(workdir: str):
  """The weights a training run started from (before step 1), adapters initialised as in the run."""
  cfg = build.load_config(workdir)
  model, params = build.build_model(cfg, data_lib.get_tokenizer(cfg.data))
  params, _ = build.transform_params(cfg, model, params)
  return params


def esd_config(config) -> diagnostics.EsdConfig:
  """The estimator: an EsdConfig preset and the diagnose config's overrides (empty / negative: keep)."""
  preset = config.get("esd_preset", "weightwatcher")
  if preset not in ESD_PRESETS:
    raise ValueError(f"config.esd_preset={preset!r}; valid: {ESD_PRESETS}")
  kw = {}
  for key in ("mode", "precision", "esd_type"):
    if config.get(key):
      kw[key] = config.get(key)
  if config.get("xmin_pos", 0) > 0:
    kw["xmin_pos"] = float(config.xmin_pos)
  if config.get("eigs_thresh", -1) >= 0:
    kw["eigs_thresh"] = int(config.eigs_thresh)
  for key in ("include_lm_head", "remove_first", "remove_last", "filter_zeros"):
    if config.get(key) is not None:
      kw[key] = bool(config.get(key))
  return getattr(diagnostics.EsdConfig, preset)(**kw)


# ---------------------------------------------------------------------------------------------------
# Plots of chosen matrices
# ---------------------------------------------------------------------------------------------------
def default_plot_layers(records) -> list[int]:
  """First, middle and last decoder block."""
  blocks = sorted({r.layer for r in records if r.layer is not None})
  if not blocks:
    return []
  return sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})


# ---------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------
def diagnose(config, workdir: str) -> dict:
  """Runs the HT-SR analysis of `config.checkpoint` and writes the tables and plots to `workdir`.

  Returns {"records", "rows", "esd_config", "files"}.
  """
  if not config.get("checkpoint"):
    raise ValueError("config.checkpoint is empty: give an HF model directory or a training workdir")
  esd_cfg = esd_config(config)
  params, model_cfg, kind = load_params(config.checkpoint, int(config.get("step", 0) or 0))
  init_params = None
  if esd_cfg.esd_type == "cul":
    if config.get("init_checkpoint"):
      init_params, _, _ = load_params(config.init_checkpoint, 0)
    elif kind == "workdir":
      init_params = initial_params(config.checkpoint)
    else:
      raise ValueError("esd_type='cul' on an HF directory needs config.init_checkpoint (the W_0)")
  records = diagnostics.analyze(params, esd_cfg, init_params=init_params)
  if not records:
    raise ValueError(f"no matrix of {config.checkpoint!r} was selected for analysis")

  os.makedirs(workdir, exist_ok=True)
  rows = diagnostics.record_rows(records)
  files = {"csv": diagnostics.write_csv(rows, os.path.join(workdir, "alphas.csv"))}
  num_blocks = getattr(model_cfg, "num_layers", None)
  files["json"] = diagnostics.write_json(
      os.path.join(workdir, "alphas.json"), checkpoint=config.checkpoint, kind=kind,
      init_checkpoint=config.get("init_checkpoint", "") or None, esd_config=esd_cfg.to_dict(),
      summary=diagnostics.summary(records), block_alphas=diagnostics.block_alphas(records, num_blocks).tolist(), rows=rows)
  title = f"{os.path.basename(os.path.normpath(config.checkpoint))}: {esd_cfg.mode}, {esd_cfg.esd_type}"
  files["alpha_per_layer"] = diagnostics.plot_alpha_per_layer(
      records, os.path.join(workdir, "alpha_per_layer.png"), title=title)

  layers = list(config.get("plot_layers", ()) or default_plot_layers(records))
  names = tuple(config.get("plot_matrices", ("q_proj", "down_proj")))
  files["esd"] = []
  for l in layers:
    for name in names:
      match = [r for r in records if r.layer == l and diagnostics.matrix_name(r.path) == name]
      if not match:
        continue
      r = match[0]
      if r.skipped == "no_adapter":          # nothing to plot: the leaf has no adapter
        continue
      lam = diagnostics.record_spectrum(params, r, esd_cfg, init_params)
      files["esd"].append(diagnostics.plot_esd(lam, r, os.path.join(workdir, f"esd_{l}_{name}.png")))

  print(f"HT-SR alphas of {config.checkpoint} ({kind}; mode={esd_cfg.mode}, xmin_pos={esd_cfg.xmin_pos}, "
        f"esd_type={esd_cfg.esd_type}, eigs_thresh={esd_cfg.eigs_thresh}, precision={esd_cfg.precision})",
        flush=True)
  print(diagnostics.format_table(records), flush=True)
  print(f"wrote {workdir}: alphas.csv, alphas.json, alpha_per_layer.png, {len(files['esd'])} ESD plots",
        flush=True)
  return {"records": records, "rows": rows, "esd_config": esd_cfg, "files": files}
