"""The `diagnose` task end to end: on a Hugging Face directory and on a training workdir, the CSV / JSON rows
are one per matrix and layer and equal `diagnostics.analyze` on the same weights (and direct numpy norms),
W_t - W_0 measures from the run's own start, and the plots are real images with the fitted tail drawn."""
import json
import math
import os

import jax
import numpy as np
import pytest

import data as data_lib
import diagnostics as dg
import models
import optim
import peft
import train_lib
from configs import diagnose as diagnose_config
from configs import sft
from diagnostics import _report

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIT_FIELDS = ("alpha", "D", "xmin", "sigma")
METRIC_FIELDS = ("alpha_weighted", "log_alpha_norm", "spectral_norm", "stable_rank", "norm",
                 "norm_stable_rank", "eig_ratio")


def _config(checkpoint, **kw):
  c = diagnose_config.get_config()
  c.checkpoint = checkpoint
  for k, v in kw.items():
    c[k] = v
  return c


def _kernel_slices(params):
  """{(path, layer): [in, out] numpy matrix} of every stacked projection kernel."""
  out = {}
  for path, x in peft.flatten(jax.device_get(params)).items():
    if path.startswith("layers/") and path.endswith("/kernel"):
      for l in range(x.shape[0]):
        out[(path, l)] = np.asarray(x[l], np.float64)
  return out


def _image(path):
  import matplotlib.image as mpimg
  assert os.path.getsize(path) > 5_000, path
  return mpimg.imread(path)


def _red_pixels(img):
  rgb = img[..., :3]
  return int(np.sum((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.25)))


def _assert_rows_match(rows, records):
  assert len(rows) == len(records)
  by_key = {(r.path, r.layer): r for r in records}
  for row in rows:
    rec = by_key[(row["path"], row["layer"])]
    assert row["N"] == rec.n_evals and row["n_valid"] == rec.n_valid and row["n_tail"] == rec.n_tail
    assert (row["skipped"] or None) == rec.skipped
    for f in FIT_FIELDS:
      np.testing.assert_allclose(row[f], getattr(rec, f), rtol=1e-12, equal_nan=True, err_msg=f)
    for f in METRIC_FIELDS:
      np.testing.assert_allclose(row[f], rec.metrics[f], rtol=1e-12, equal_nan=True, err_msg=f)


# ---------------------------------------------------------------------------------------------------
# A Hugging Face directory
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  cfg = models.DecoderConfig.tiny(vocab_size=97, hidden_size=96, intermediate_size=160, num_layers=3)
  params = models.Decoder(cfg).init(jax.random.PRNGKey(3))
  path = str(tmp_path_factory.mktemp("hf"))
  models.save_hf(path, cfg, params)
  return path, cfg, params


def test_hf_directory_rows_equal_analyze_and_direct_norms(hf_model, tmp_path, capsys):
  path, cfg, params = hf_model
  out = str(tmp_path / "out")
  res = train_lib.run_task(_config(path, eigs_thresh=16), out)

  rows = dg.read_csv(os.path.join(out, "alphas.csv"))
  assert len(rows) == len(PROJ) * cfg.num_layers                  # lm_head and embeddings excluded
  assert {(r["name"], r["layer"]) for r in rows} == {(n, l) for n in PROJ for l in range(cfg.num_layers)}
  # The saved weights, not the loaded ones: the HF round trip is part of what is checked.
  expected = dg.analyze(params, dg.EsdConfig.weightwatcher(eigs_thresh=16))
  _assert_rows_match(rows, expected)
  assert all(r["skipped"] == "" and 1.0 < r["alpha"] < 50 for r in rows)

  mats = _kernel_slices(params)
  for row in rows:
    w = mats[(row["path"], row["layer"])]
    sv = np.linalg.svd(w, compute_uv=False)
    assert row["N"] == min(w.shape) and row["shape"] == f"{w.shape[0]}x{w.shape[1]}"
    np.testing.assert_allclose(row["frobenius_norm"], np.linalg.norm(w), rtol=1e-9)
    np.testing.assert_allclose(row["spectral_norm"], sv[0] ** 2, rtol=1e-9)
    np.testing.assert_allclose(row["stable_rank"], np.sum(sv ** 2) / sv[0] ** 2, rtol=1e-9)
    # The Hill exponent at the reported xmin, straight from the singular values.
    lam = np.sort(sv[sv ** 2 > 1e-5] ** 2)
    tail = lam[lam >= row["xmin"]]
    assert len(tail) == row["n_tail"]
    np.testing.assert_allclose(row["alpha"], 1 + len(tail) / np.sum(np.log(tail / row["xmin"])), rtol=1e-9)

  doc = json.load(open(os.path.join(out, "alphas.json")))
  assert doc["kind"] == "hf" and doc["checkpoint"] == path
  want_cfg = json.loads(json.dumps(dg.EsdConfig.weightwatcher(eigs_thresh=16).to_dict()))
  assert doc["esd_config"] == want_cfg
  assert [(r["path"], r["layer"]) for r in doc["rows"]] == [(r["path"], r["layer"]) for r in rows]
  np.testing.assert_allclose([r["alpha"] for r in doc["rows"]], [r["alpha"] for r in rows], rtol=1e-12)
  for l, a in enumerate(doc["block_alphas"]):
    np.testing.assert_allclose(a, np.mean([r["alpha"] for r in rows if r["layer"] == l]), rtol=1e-12)

  # Plots: first / middle / last block x (q_proj, down_proj), decodable, not blank, the fit drawn in red.
  names = sorted(os.path.basename(p) for p in res["files"]["esd"])
  assert names == sorted(f"esd_{l}_{n}.png" for l in (0, 1, 2) for n in ("q_proj", "down_proj"))
  for name in names + ["alpha_per_layer.png"]:
    img = _image(os.path.join(out, name))
    assert img.shape[0] >= 300 and img.shape[1] >= 500
    assert img[..., :3].std() > 0.05
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20
  assert _red_pixels(_image(os.path.join(out, "esd_0_q_proj.png"))) > 200
  assert _red_pixels(_image(os.path.join(out, "alpha_per_layer.png"))) > 0   # o_proj's line

  printed = capsys.readouterr().out
  assert "q_proj" in printed and "down_proj" in printed
  assert f"{len(rows)} matrices, {len(rows)} fitted" in printed


def test_hf_directory_threshold_preset_and_options(hf_model, tmp_path):
  path, cfg, params = hf_model
  out = str(tmp_path / "out")
  # N of k/v_proj is 2 kv heads x 24 = 48 < 64: skipped without a fit; the others fitted by the median rule.
  train_lib.run_task(_config(path, esd_preset="tempbalance", eigs_thresh=64, plot_layers=(1,),
                             plot_matrices=("k_proj", "up_proj")), out)
  rows = dg.read_csv(os.path.join(out, "alphas.csv"))
  assert len(rows) == len(PROJ) * cfg.num_layers + 1               # TempBalance analyses lm_head too
  for r in rows:
    if r["name"] in ("k_proj", "v_proj"):
      assert r["skipped"] == "eigs_thresh" and math.isnan(r["alpha"]) and r["N"] == 48
  _assert_rows_match(rows, dg.analyze(params, dg.EsdConfig.tempbalance(eigs_thresh=64)))
  scheduled = [r for r in rows if r["skipped"] == ""]
  assert len(scheduled) == 5 * cfg.num_layers - 1                  # block 0's q_proj and lm_head dropped
  assert {(r["name"], r["skipped"]) for r in rows if r["skipped"] in ("first", "last")} == {
      ("q_proj", "first"), ("lm_head", "last")}
  doc = json.load(open(os.path.join(out, "alphas.json")))
  assert doc["esd_config"]["mode"] == "median" and doc["esd_config"]["remove_first"] is True
  assert any(r["alpha"] is None for r in doc["rows"])              # strict JSON: NaN as null
  # Only the chosen plots; a skipped matrix still gets its histogram, without a fitted line.
  assert sorted(f for f in os.listdir(out) if f.startswith("esd_")) == ["esd_1_k_proj.png", "esd_1_up_proj.png"]
  assert _red_pixels(_image(os.path.join(out, "esd_1_k_proj.png"))) < 20
  assert _red_pixels(_image(os.path.join(out, "esd_1_up_proj.png"))) > 200


def test_bad_checkpoints_fail_with_a_reason(hf_model, tmp_path):
  path, _, _ = hf_model
  with pytest.raises(ValueError, match="init_checkpoint"):
    train_lib.run_task(_config(path, esd_type="cul"), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    train_lib.run_task(_config(str(tmp_path)), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="esd_preset"):
    train_lib.run_task(_config(path, esd_preset="ww"), str(tmp_path / "c"))


def test_tail_density_integrates_to_the_tail_share():
  alpha, xmin, share = 2.7, 0.3, 0.4
  grid = np.logspace(np.log10(xmin), 8, 200_001)
  p = _report.tail_density(grid, alpha, xmin, share)
  mass = np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(grid))
  np.testing.assert_allclose(mass, share, rtol=1e-3)
  assert _report.tail_density(np.array([0.9 * xmin]), alpha, xmin, share)[0] == 0.0
  # Slope -alpha on log-log axes.
  np.testing.assert_allclose(np.diff(np.log(p[[10, 5000]])) / np.diff(np.log(grid[[10, 5000]])), -alpha)


# ---------------------------------------------------------------------------------------------------
# A project training workdir
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("sft_smoke"))
  config = sft.get_config("model=tiny,smoke")
  summary = train_lib.train_and_evaluate(config, wd)
  return wd, config, peft.combine(summary["state"].params, summary["frozen"])


def test_workdir_rows_equal_analyze_of_the_trained_weights(trained, tmp_path):
  wd, config, params = trained
  out = str(tmp_path / "out")
  train_lib.run_task(_config(wd, eigs_thresh=16), out)
  rows = dg.read_csv(os.path.join(out, "alphas.csv"))
  num_layers = models.DecoderConfig.tiny().num_layers
  assert len(rows) == len(PROJ) * num_layers
  _assert_rows_match(rows, dg.analyze(params, dg.EsdConfig.weightwatcher(eigs_thresh=16)))
  doc = json.load(open(os.path.join(out, "alphas.json")))
  assert doc["kind"] == "workdir"
  assert sorted(f for f in os.listdir(out) if f.startswith("esd_")) == sorted(
      f"esd_{l}_{n}.png" for l in range(num_layers) for n in ("q_proj", "down_proj"))


def test_workdir_cul_measures_the_update_from_the_runs_start(trained, tmp_path):
  wd, config, params = trained
  out = str(tmp_path / "out")
  train_lib.run_task(_config(wd, eigs_thresh=16, esd_type="cul"), out)
  rows = dg.read_csv(os.path.join(out, "alphas.csv"))
  # W_0 rebuilt independently: the preset's random init under the run's seed.
  cfg = models.preset("tiny", vocab_size=data_lib.get_tokenizer(config.data).vocab_size)
  init = models.Decoder(cfg).init(jax.random.PRNGKey(config.seed))
  _assert_rows_match(rows, dg.analyze(params, dg.EsdConfig.weightwatcher(eigs_thresh=16, esd_type="cul"),
                                      init_params=init))
  # The update after 8 steps is small: its Frobenius norm is ||W_t - W_0||, far below ||W_t||.
  mats, mats0 = _kernel_slices(params), _kernel_slices(init)
  for row in rows:
    key = (row["path"], row["layer"])
    np.testing.assert_allclose(row["frobenius_norm"], np.linalg.norm(mats[key] - mats0[key]), rtol=1e-9)
    assert row["frobenius_norm"] < 0.5 * np.linalg.norm(mats[key])


# ---------------------------------------------------------------------------------------------------
# The low-data experiment's config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("assign,scheduled,blocks", [("tb_linear_map", 27, 0), ("sigmoid", 28, 0),
                                                     ("sigmoid,mb_unit=block", 28, 4)])
def test_tempbalance_config_schedules_every_projection_of_the_small_model(assign, scheduled, blocks):
  from configs import tempbalance
  from train_lib import validate
  config = tempbalance.get_config(f"assign={assign},train_size=250")
  validate.validate(config, num_devices=1)
  assert config.data.train_size == 250 and config.tempbalance.enabled
  cfg = models.preset(config.model.name, vocab_size=data_lib.get_tokenizer(config.data).vocab_size)
  shapes = jax.eval_shape(models.Decoder(cfg).init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  tb = optim.tempbalance_config(config.tempbalance)
  # Host float64 fits: the same selection and exclusions without compiling the device fit in a test.
  sched = optim.schedule(params, tb.replace(esd=tb.esd.replace(precision="float64")))
  # 7 projections x 4 blocks, k/v_proj (N = 64) included, and lm_head (N = 58); TempBalance drops block 0's
  # q_proj and lm_head, Model Balancing lm_head.
  assert len(sched.records) == 29 and not any(r.skipped == "eigs_thresh" for r in sched.records)
  assert len(sched.per_record) == scheduled and len(sched.per_block) == blocks
  f = np.asarray(list(sched.per_record.values()))
  assert f.max() - f.min() > 0.1
