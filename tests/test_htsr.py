"""HT-SR estimator: parity with WeightWatcher, the references' formulas evaluated directly, planted power
laws, invariances, static-shape filtering, and the tree-level `analyze` (stacked slices, adapters, W_t - W_0).
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diagnostics as dg
import peft
from tests import refenv


# ---------------------------------------------------------------------------------------------------
# Direct evaluations of the references' rules (METHODS.md A1), one loop iteration per candidate xmin
# ---------------------------------------------------------------------------------------------------
def _direct_median(lam, xmin_pos):
  N = len(lam)
  i = int(N / xmin_pos)
  n = N - i
  log = np.log(lam)
  alpha = 1 + n / (np.sum(log[i:]) - n * log[i])
  D = np.max(np.abs(1 - (lam[i:] / lam[i]) ** (1 - alpha) - np.arange(n) / n))
  return alpha, D, lam[i]


def _direct_scan(lam, fix_finger=False, compat=False, bins=100):
  N = len(lam)
  log = np.log(lam)
  alphas, Ds = np.zeros(N - 1), np.ones(N - 1)
  if fix_finger:
    counts, edges = np.histogram(np.log10(lam), bins=bins)
    peak = 10 ** edges[np.argmax(counts)]
    lo, hi = (np.log10(0.95 * peak) if compat else 0.95 * peak), 1.5 * peak
  for i in range(N - 1):
    if fix_finger and lam[i] < lo:
      continue
    if fix_finger and lam[i] > hi:
      break
    n = N - i
    alphas[i] = 1 + n / (np.sum(log[i:]) - n * log[i])
    if alphas[i] > 1:
      Ds[i] = np.max(np.abs(1 - (lam[i:] / lam[i]) ** (1 - alphas[i]) - np.arange(n) / n))
  j = int(np.argmin(Ds))
  return alphas[j], Ds[j], lam[j]


def _heavy(rng, m, n, dof=3):
  return rng.standard_t(dof, size=(m, n)).astype(np.float32)


def _planted(rng, m, n, alpha):
  """A matrix whose ESD is a Pareto(alpha) sample from 1: W = U diag(sqrt(lambda)) V^T."""
  N = min(m, n)
  lam = (1 - rng.uniform(size=N)) ** (-1 / (alpha - 1))
  u, _ = np.linalg.qr(rng.standard_normal((m, N)))
  v, _ = np.linalg.qr(rng.standard_normal((n, N)))
  return (u * np.sqrt(lam)) @ v.T, np.sort(lam)


def _matrices():
  rng = np.random.default_rng(0)
  low_rank = rng.standard_normal((100, 40)) @ rng.standard_normal((40, 60))
  return {
      "m0": rng.standard_normal((64, 160)) @ rng.standard_normal((160, 160)) @ rng.standard_normal((160, 160)),
      "m1": _heavy(rng, 200, 100),
      "m2": _planted(rng, 120, 80, 2.5)[0],
      "m3": low_rank,                              # 20 zero eigenvalues: the zero filter matters
      "m4": _heavy(rng, 30, 90, dof=2),
      "m5": rng.standard_normal((5, 40)),          # below min_evals: skipped on both sides
  }


# ---------------------------------------------------------------------------------------------------
# Parity with WeightWatcher
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_goodness_of_fit_matches_weightwatcher():
  """WW `analyze()` defaults (pl_package='ww', fix_fingers=False, min_evals=8) are our goodness-of-fit scan
  over lambda > 1e-5 with eigs_thresh=8 (`EsdConfig.weightwatcher()`). WW 0.7.7 fits spectra with fewer
  than 20 kept eigenvalues by another (bias-corrected) rule, so every fitted matrix here keeps >= 20."""
  mats = {k: np.asarray(v, np.float32) for k, v in _matrices().items()}
  ref = refenv.run("ww_alphas", {f"m{i}": mats[f"m{i}"] for i in range(len(mats))})
  params = {k: {"kernel": v} for k, v in mats.items()}
  records = {r.path: r for r in dg.analyze(params, dg.EsdConfig.weightwatcher())}
  for i in range(len(mats)):
    r = records[f"m{i}/kernel"]
    if not ref["analysed"][i]:
      assert r.skipped == "eigs_thresh"
      continue
    assert r.skipped is None and r.n_evals == ref["num_evals"][i]
    np.testing.assert_allclose(r.alpha, ref["alpha"][i], rtol=1e-7, err_msg=f"m{i}")
    np.testing.assert_allclose([r.xmin, r.D, r.sigma], [ref[k][i] for k in ("xmin", "D", "sigma")], rtol=1e-7)
    np.testing.assert_allclose([r.metrics[k] for k in ("alpha_weighted", "log_alpha_norm", "spectral_norm",
                                                       "stable_rank", "norm")],
                               [ref[k][i] for k in ("alpha_weighted", "log_alpha_norm", "spectral_norm",
                                                    "stable_rank", "norm")], rtol=1e-7)
  assert not ref["analysed"][5] and ref["analysed"][:5].all()
  # The float32 device path (Gram eigvalsh, jitted scan) lands on the same xmin on these spectra.
  some = {k: params[k] for k in ("m1", "m4")}
  for r in dg.analyze(some, dg.EsdConfig.weightwatcher(precision="float32")):
    i = int(r.path[1])
    np.testing.assert_allclose(r.alpha, ref["alpha"][i], rtol=1e-3, err_msg=r.path)


def _finger_matrices():
  """Gaussian (Marchenko-Pastur bulk) and Student-t matrices; on several of these the goodness-of-fit xmin
  sits high in the spectrum and clipping top eigenvalues lowers alpha by more than 1 (fingers)."""
  rng = np.random.default_rng(0)
  mats = []
  for trial in range(12):
    mats.append(rng.standard_normal((80, 160)) if trial % 3 == 0 else rng.standard_t(4, size=(80, 160))
                if trial % 3 == 1 else rng.standard_normal((80, 160))
                + 0.5 * rng.standard_normal((80, 3)) @ rng.standard_normal((3, 160)))
  return [m.astype(np.float32) for m in mats]


@pytest.mark.parity
def test_clip_xmax_matches_weightwatcher():
  """WW `analyze(fix_fingers='clip_xmax')` (its defaults otherwise) is our goodness-of-fit scan with
  `clip_xmax=True`: the same alpha, xmin, D, sigma and number of fingers, fingers found or not."""
  mats = _finger_matrices()
  ref = refenv.run("ww_alphas", {f"m{i}": m for i, m in enumerate(mats)}, fix_fingers="clip_xmax")
  params = {f"m{i}": {"kernel": m} for i, m in enumerate(mats)}
  config = dg.EsdConfig.weightwatcher(clip_xmax=True)
  records = {r.path: r for r in dg.analyze(params, config)}
  fingers = []
  for i, m in enumerate(mats):
    r = records[f"m{i}/kernel"]
    assert ref["analysed"][i]
    np.testing.assert_allclose([r.alpha, r.xmin, r.D, r.sigma], [ref[k][i] for k in ("alpha", "xmin", "D", "sigma")],
                               rtol=1e-7, err_msg=f"m{i}")
    lam = np.sort(np.linalg.svd(m.astype(np.float64), compute_uv=False) ** 2)
    f = dg.fit_powerlaw(lam[lam > 1e-5], mode="goodness_of_fit", clip_xmax=True)
    assert int(f.num_fingers) == ref["num_fingers"][i]
    fingers.append(int(f.num_fingers))
  # The comparison covers both branches: spectra with fingers clipped and spectra left whole.
  assert any(fingers) and not all(fingers)
  # Off by default, as in WeightWatcher: the default preset gives the unclipped fit.
  plain = {r.path: r for r in dg.analyze(params, dg.EsdConfig.weightwatcher())}
  assert any(plain[p].alpha != records[p].alpha for p in records)


def _direct_clip_xmax(lam, max_fingers=10, thresh=1.0, min_alpha=2.0):
  """WeightWatcher's fit_clipped_powerlaw loop over _direct_scan fits: (alpha, xmin, num_fingers)."""
  first = _direct_scan(lam)
  for c in range(2, max_fingers):
    fit = _direct_scan(lam[:-c])
    if fit[0] + thresh < first[0]:
      return fit[0], fit[2], c - 1
    if fit[0] <= min_alpha:
      break
  return first[0], first[2], 0


def test_clip_xmax_matches_direct_loop():
  found = 0
  for m in _finger_matrices()[:6]:
    lam = np.sort(np.linalg.svd(m.astype(np.float64), compute_uv=False) ** 2)
    alpha, xmin, n = _direct_clip_xmax(lam)
    f = dg.fit_powerlaw(lam, mode="goodness_of_fit", clip_xmax=True)
    np.testing.assert_allclose([f.alpha, f.xmin], [alpha, xmin], rtol=1e-10)
    assert int(f.num_fingers) == n and int(f.n_tail) == len(lam) - n - 1 * (n > 0) - int(f.index)
    found += n > 0
    # jit-able: the same fit on device in float32.
    g = jax.jit(lambda l: dg.fit_powerlaw(l, mode="goodness_of_fit", clip_xmax=True))(jnp.asarray(lam, jnp.float32))
    np.testing.assert_allclose(g.alpha, alpha, rtol=1e-3)
    assert int(g.num_fingers) == n
  assert found


# ---------------------------------------------------------------------------------------------------
# The references' formulas, evaluated directly
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xmin_pos", [2.0, 1.5])
def test_median_matches_tempbalance_formula(xmin_pos):
  rng = np.random.default_rng(1)
  stacked = np.stack([_heavy(rng, 48, 80, dof=d) for d in (2, 3, 5)])
  params = {"layers": {"mlp": {"up_proj": {"kernel": stacked}}}, "head": {"kernel": _heavy(rng, 90, 70)}}
  for precision, rtol in (("float64", 1e-10), ("float32", 2e-4)):
    config = dg.EsdConfig(mode="median", xmin_pos=xmin_pos, eigs_thresh=0, precision=precision)
    records = dg.analyze(params, config)
    assert [(r.path, r.layer) for r in records] == [("layers/mlp/up_proj/kernel", l) for l in range(3)] + [
        ("head/kernel", None)]                      # network order: a matrix outside the blocks comes after
    for r in records:
      w = params["head"]["kernel"] if r.layer is None else stacked[r.layer]
      lam = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
      alpha, D, xmin = _direct_median(lam, xmin_pos)
      np.testing.assert_allclose([r.alpha, r.D, r.xmin], [alpha, D, xmin], rtol=rtol)
      assert r.n_tail == len(lam) - int(len(lam) / xmin_pos)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_goodness_of_fit_matches_direct_scan(precision):
  rng = np.random.default_rng(2)
  for w in (_heavy(rng, 60, 90), _planted(rng, 70, 50, 3.0)[0]):
    lam = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    alpha, D, xmin = _direct_scan(lam)
    # chunk=7 does not divide N: padded rows must not leak into the result.
    f = dg.fit_matrices(w, dg.EsdConfig(mode="goodness_of_fit", precision=precision, chunk=7))
    rtol = 1e-10 if precision == "float64" else 1e-4
    np.testing.assert_allclose([f["alpha"], f["D"], f["xmin"]], [alpha, D, xmin], rtol=rtol)


def _finger_spectrum():
  """Exact Pareto(2.5) quantiles from 3 plus a 40-eigenvalue finger at 600: the histogram peak is the
  finger, while the best KS fit starts at the bottom of the power law, far below 0.95 * peak."""
  q = (np.arange(300) + 0.5) / 300
  return np.sort(np.concatenate([3.0 * (1 - q) ** (-1 / 1.5), np.linspace(600, 606, 40)]))


@pytest.mark.parametrize("compat", [True, False])
def test_fix_finger_matches_direct_loop(compat):
  rng = np.random.default_rng(3)
  spectra = [_finger_spectrum()] + [np.sort(np.linalg.svd(_heavy(rng, 80, 120, d).astype(np.float64),
                                                          compute_uv=False) ** 2) for d in (2, 4)]
  for lam in spectra:
    alpha, D, xmin = _direct_scan(lam, fix_finger=True, compat=compat)
    f = dg.fit_powerlaw(lam, mode="fix_finger", compat_fix_finger_bug=compat)
    np.testing.assert_allclose([f.alpha, f.D, f.xmin], [alpha, D, xmin], rtol=1e-10)
  lam = spectra[0]
  g = jax.jit(lambda l: dg.fit_powerlaw(l, mode="fix_finger", compat_fix_finger_bug=compat))(
      jnp.asarray(lam, jnp.float32))
  np.testing.assert_allclose([g.alpha, g.xmin], _direct_scan(lam, True, compat)[::2], rtol=1e-4)


def test_fix_finger_linear_bound_binds():
  lam = _finger_spectrum()
  counts, edges = np.histogram(np.log10(lam), bins=100)
  peak = 10 ** edges[np.argmax(counts)]
  fixed = dg.fit_powerlaw(lam, mode="fix_finger")
  buggy = dg.fit_powerlaw(lam, mode="fix_finger", compat_fix_finger_bug=True)
  assert 0.95 * peak <= fixed.xmin <= 1.5 * peak
  assert buggy.xmin < 0.95 * peak                  # the log10 bound let a far smaller xmin in
  assert abs(float(buggy.alpha) - 2.5) < 0.7 < abs(float(fixed.alpha) - 2.5)


# ---------------------------------------------------------------------------------------------------
# Planted power laws and invariances
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["median", "goodness_of_fit"])
def test_planted_pareto_alpha_recovered(mode):
  """Hill's estimator on a Pareto(alpha) tail of size n has standard error (alpha - 1) / sqrt(n)."""
  rng = np.random.default_rng(4)
  alpha, N, K = 2.5, 400, 12
  fits = [dg.fit_powerlaw(np.sort((1 - rng.uniform(size=N)) ** (-1 / (alpha - 1))), mode=mode)
          for _ in range(K)]
  est = np.asarray([float(f.alpha) for f in fits])
  n_tail = np.asarray([int(f.n_tail) for f in fits])
  np.testing.assert_allclose([float(f.sigma) for f in fits], (est - 1) / np.sqrt(n_tail), rtol=1e-12)
  se = (alpha - 1) / np.sqrt(n_tail)
  assert np.all(np.abs(est - alpha) < 3.5 * se)
  assert abs(est.mean() - alpha) < 3 * np.sqrt(np.mean(se ** 2) / K)
  if mode == "median":
    assert np.all(n_tail == N // 2)


def test_planted_spectrum_through_the_matrix():
  rng = np.random.default_rng(5)
  w, lam = _planted(rng, 150, 90, 2.0)
  f = dg.fit_matrices(w, dg.EsdConfig(precision="float64"))
  g = dg.fit_powerlaw(lam)
  np.testing.assert_allclose([f["alpha"], f["xmin"]], [g.alpha, g.xmin], rtol=1e-9)
  assert abs(float(f["alpha"]) - 2.0) < 3.5 * float(f["sigma"])


@pytest.mark.parametrize("mode", dg.MODES)
def test_alpha_invariant_to_scale_and_transpose(mode):
  rng = np.random.default_rng(6)
  w = _heavy(rng, 70, 110).astype(np.float64)
  config = dg.EsdConfig(mode=mode, precision="float64")
  fits = [dg.fit_matrices(x, config) for x in (w, 37.0 * w, w.T, 1e-3 * w.T)]
  for f in fits[1:]:
    np.testing.assert_allclose([f["alpha"], f["D"]], [fits[0]["alpha"], fits[0]["D"]], rtol=1e-9)
    assert f["index"] == fits[0]["index"]
  if mode == "median":                             # the jit-able fit, in float32 on the device
    f32 = [dg.fit_matrices(x, config.replace(precision="float32")) for x in (w, 37.0 * w, w.T)]
    np.testing.assert_allclose([f["alpha"] for f in f32], fits[0]["alpha"], rtol=2e-4)


# ---------------------------------------------------------------------------------------------------
# Static-shape filtering and jit
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", dg.MODES)
def test_num_valid_equals_truncated_spectrum(mode):
  """The zero filter is a count, not a slice: fitting the top m of N equals fitting the slice itself."""
  rng = np.random.default_rng(7)
  lam = np.sort(np.linalg.svd(_heavy(rng, 80, 100).astype(np.float64), compute_uv=False) ** 2)
  lam[:15] = 0.0                                   # a rank-deficient bottom
  m = len(lam) - 15
  masked = dg.fit_powerlaw(lam, mode=mode, num_valid=m, xmin_pos=1.5)
  sliced = dg.fit_powerlaw(lam[15:], mode=mode, xmin_pos=1.5)
  np.testing.assert_allclose([masked.alpha, masked.D, masked.xmin], [sliced.alpha, sliced.D, sliced.xmin],
                             rtol=1e-12)
  assert masked.index == sliced.index + 15
  fit = jax.jit(lambda l, k: dg.fit_powerlaw(l, mode=mode, num_valid=k, xmin_pos=1.5))
  traced = fit(jnp.asarray(lam, jnp.float32), jnp.asarray(m))
  np.testing.assert_allclose([traced.alpha, traced.xmin], [sliced.alpha, sliced.xmin], rtol=1e-4)


def test_metrics_formulas():
  rng = np.random.default_rng(8)
  w = _heavy(rng, 50, 75).astype(np.float64)
  lam = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
  f = dg.fit_matrices(w, dg.EsdConfig(precision="float64"))
  a = float(f["alpha"])
  expected = dict(alpha_weighted=a * np.log10(lam[-1]), log_alpha_norm=np.log10(np.sum(lam ** a)),
                  spectral_norm=lam[-1], norm=np.sum(w ** 2), stable_rank=np.sum(lam) / lam[-1],
                  norm_stable_rank=np.mean(lam), eig_ratio=lam[-1] / lam[len(lam) // 2])
  for k, v in expected.items():
    np.testing.assert_allclose(f[k], v, rtol=1e-10, err_msg=k)
  # float32 does not overflow lambda^alpha: the max is factored out.
  big = dg.fit_matrices(1e4 * w, dg.EsdConfig(precision="float32"))
  np.testing.assert_allclose(big["log_alpha_norm"], np.log10(np.sum((1e8 * lam) ** a)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Trees: selection, exclusions, blocks, adapters
# ---------------------------------------------------------------------------------------------------
def test_analyze_decoder_tree():
  from models import Decoder, DecoderConfig
  cfg = DecoderConfig.tiny()                       # D=64, F=176, kv width 32, 2 layers
  params = Decoder(cfg).init(jax.random.PRNGKey(0))
  config = dg.EsdConfig(precision="float64", eigs_thresh=50)
  records = dg.analyze(params, config)
  kinds = ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
           "mlp/down_proj"]                           # network order, as the torch references' named_modules
  assert [(r.path, r.layer) for r in records] == [(f"layers/{k}/kernel", l) for l in range(2) for k in kinds]
  assert all(r.config is config for r in records)
  for r in records:
    narrow = r.path.split("/")[2] in ("k_proj", "v_proj")    # GQA: N = kv_heads * head_dim = 32 < 50
    assert (r.skipped == "eigs_thresh") == narrow and np.isnan(r.alpha) == narrow
    assert r.n_evals == (32 if narrow else 64)
  used = [r for r in records if r.skipped is None]
  np.testing.assert_allclose(dg.block_alphas(records),
                             [np.mean([r.alpha for r in used if r.layer == l]) for l in range(2)])
  w = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1])
  direct = _direct_median(np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2), 2.0)
  down1 = [r for r in records if r.path == "layers/mlp/down_proj/kernel" and r.layer == 1][0]
  np.testing.assert_allclose(down1.alpha, direct[0], rtol=1e-10)

  with_head = dg.analyze(params, config.replace(include_lm_head=True, remove_first=True, remove_last=True))
  assert with_head[-1].path == "lm_head/kernel" and with_head[-1].skipped == "last"
  assert np.isfinite(with_head[-1].alpha)          # excluded from schedules, still reported
  assert (with_head[1].path, with_head[1].layer, with_head[1].skipped) == ("layers/attn/k_proj/kernel", 0,
                                                                            "eigs_thresh")
  first = [r for r in with_head if r.skipped == "first"]
  assert [(r.path, r.layer) for r in first] == [("layers/attn/q_proj/kernel", 0)]
  assert not any(r.path == "embed/embedding" for r in with_head)
  assert any(r.path == "embed/embedding" for r in dg.analyze(params, config.replace(include_embed=True)))


@flax.struct.dataclass
class _Lora(peft.Adapter):
  """Test-only LoRA node: W0 + s A B."""
  base: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  trainable_fields = ("a", "b")

  def dot(self, x):
    return x @ self.base + self.scale * (x @ self.a) @ self.b

  def materialize(self):
    return self.base + self.scale * self.a @ self.b


def _lora_tree(rng, b_scale=1.0):
  base = jnp.asarray(np.stack([_heavy(rng, 64, 96) for _ in range(2)]))
  a = jnp.asarray(rng.standard_normal((2, 64, 8)), jnp.float32)
  b = jnp.asarray(b_scale * rng.standard_normal((2, 8, 96)), jnp.float32)
  other = jnp.asarray(_heavy(rng, 64, 64))
  return {"layers": {"attn": {"q_proj": {"kernel": _Lora(base, a, b, 0.5)}}}, "out": {"kernel": other}}


def test_adapter_spectra():
  rng = np.random.default_rng(9)
  params = _lora_tree(rng)
  node = params["layers"]["attn"]["q_proj"]["kernel"]
  config = dg.EsdConfig(precision="float64", eigs_thresh=0, filter_zeros=True)

  full = {(r.path, r.layer): r for r in dg.analyze(params, config)}
  merged = {(r.path, r.layer): r for r in dg.analyze(peft.merge(params), config)}
  assert full.keys() == merged.keys()
  for k in full:
    np.testing.assert_allclose(full[k].alpha, merged[k].alpha, rtol=1e-12)

  delta = {(r.path, r.layer): r for r in dg.analyze(params, config.replace(esd_type="delta"))}
  assert delta[("out/kernel", None)].skipped == "no_adapter"
  dw = {"layers": {"attn": {"q_proj": {"kernel": 0.5 * node.a @ node.b}}}}
  for l in range(2):
    r = delta[("layers/attn/q_proj/kernel", l)]
    direct = dg.analyze(dw, config)[l]
    assert r.n_valid == 8                          # rank-8 update: the zero filter keeps 8 eigenvalues
    np.testing.assert_allclose(r.alpha, direct.alpha, rtol=1e-6)

  moved = jax.tree.map(lambda x: x + 0.01 * jnp.sin(17.0 * x), params)
  cul = dg.analyze(moved, config.replace(esd_type="cul"), init_params=params)
  diff = jax.tree.map(lambda x, y: x - y, peft.merge(moved), peft.merge(params))
  for r, d in zip(cul, dg.analyze(diff, config)):
    assert (r.path, r.layer) == (d.path, d.layer)
    np.testing.assert_allclose(r.alpha, d.alpha, rtol=1e-6)
  with pytest.raises(ValueError, match="init_params"):
    dg.analyze(moved, config.replace(esd_type="cul"))


def test_config_validation():
  with pytest.raises(ValueError, match="mode"):
    dg.EsdConfig(mode="xmin_peak")
  with pytest.raises(ValueError, match="xmin_pos"):
    dg.EsdConfig(xmin_pos=1.0)
  with pytest.raises(ValueError, match="unknown EsdConfig fields"):
    dg.EsdConfig.make({"mode": "median", "xmin_position": 2})
  assert dg.EsdConfig.make({"mode": "fix_finger", "bins": 50}) == dg.EsdConfig(mode="fix_finger", bins=50)
