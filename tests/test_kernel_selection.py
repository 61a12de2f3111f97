"""DPO-Kernels' data-driven selection (losses/_kernel_selection.py): every statistic equals a float64 numpy
evaluation of its definition written here independently, and the chosen pair follows the rule."""
import json
import os

import jax
import numpy as np
import pytest

import losses
from losses import _kernel_selection as ks

RNG = np.random.default_rng(0)


# ---- the definitions, in float64 numpy, kernel values (not logs) ------------------------------------
def k_poly(a, b, c, d):
  return (a @ b + c) ** d


def k_rbf(a, b, sigma):
  return np.exp(-np.sum((a - b) ** 2) / (2 * sigma ** 2))


def k_spectral(a, b, lambdas, alphas):
  d2 = np.sum((a - b) ** 2)
  return sum(l * np.exp(-al * d2) for l, al in zip(lambdas, alphas))


def k_maha(a, b, chol, eps):
  L = np.tril(chol)
  S = L @ L.T + eps * np.eye(len(a))
  return np.exp(-0.5 * (a - b) @ S @ (a - b))


def np_separability(K, x, c, r):
  n = len(x)
  h = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i != j:
        kx = K(x[i], x[j])
        h[i, j] = kx * (K(c[i], c[j]) + K(r[i], r[j]) - K(c[i], r[j]) - K(r[i], c[j]))
  mmd2 = h.sum() / (n * (n - 1))
  H = h.sum(1) / (n - 1)
  var = 4.0 / n * np.mean((H - mmd2) ** 2)
  return mmd2 / np.sqrt(var)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


NP_DIVERGENCES = {
    "kl": lambda p, q: np.sum(p * np.log(p / q)),
    "js": lambda p, q: 0.5 * np.sum(p * np.log(2 * p / (p + q))) + 0.5 * np.sum(q * np.log(2 * q / (p + q))),
    "hellinger": lambda p, q: 0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2),
    "renyi": lambda p, q: np.log(np.sum(p ** 1.3 * q ** (1 - 1.3))) / (1.3 - 1),
    "bhattacharyya": lambda p, q: -np.log(np.sum(np.sqrt(p * q))),
    "f": lambda p, q: np.sum(q * (p / q - 1) ** 2),                     # Pearson chi^2 (the default f)
    "wasserstein": lambda p, q: 0.5 * np.sum(np.abs(p - q)),           # W1 under the 0/1 cost = TV
}


def np_pnd(name, logits_c, logits_r):
  p, q = np_softmax(logits_c), np_softmax(logits_r)
  D = NP_DIVERGENCES[name]
  n = len(p)
  return np.mean([D(p[i], q[i]) for i in range(n)]) / np.mean([D(p[i], p[(i + 1) % n]) for i in range(n)])


CFG = {"rbf_sigma": 1.3, "poly_c": 2.0, "poly_degree": 3, "spectral_lambdas": (1.0, 0.5),
       "spectral_alphas": (0.3, 0.1), "maha_eps": 1e-3, "renyi_a": 1.3, "f_generator": "pearson",
       "wasserstein_k": 8}
CHOL = np.tril(RNG.normal(size=(4, 4))) * 0.5 + np.eye(4)
NP_KERNELS = {
    "polynomial": lambda a, b: k_poly(a, b, 2.0, 3),
    "rbf": lambda a, b: k_rbf(a, b, 1.3),
    "spectral": lambda a, b: k_spectral(a, b, (1.0, 0.5), (0.3, 0.1)),
    "mahalanobis": lambda a, b: k_maha(a, b, CHOL, 1e-3),
}


def _embeddings(n=9, d=4, scale=0.4):
  x, c, r = (RNG.normal(size=(n, d)) * scale for _ in range(3))
  return x, c + 0.3, r


@pytest.mark.parametrize("kind", ["polynomial", "rbf", "spectral", "mahalanobis"])
def test_kernel_separability_equals_its_definition(kind):
  x, c, r = _embeddings()
  want = np_separability(NP_KERNELS[kind], x, c, r)
  with jax.enable_x64(True):
    got = float(ks.kernel_separability(kind, x, c, r, **ks.kernel_params(kind, CFG, CHOL)))
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert abs(want) > 1e-3     # a real value, not the degenerate 0


@pytest.mark.parametrize("kind", ["polynomial", "rbf", "spectral", "mahalanobis"])
def test_kernel_margin_statistics_equal_their_definition(kind):
  x, c, r = _embeddings()
  K = NP_KERNELS[kind]
  m = np.array([np.log(K(x[i], c[i])) - np.log(K(x[i], r[i])) for i in range(len(x))])
  with jax.enable_x64(True):
    got = ks.kernel_margin_stats(kind, x, c, r, **ks.kernel_params(kind, CFG, CHOL))
  np.testing.assert_allclose(float(got["margin_mean"]), m.mean(), rtol=1e-9)
  np.testing.assert_allclose(float(got["margin_pos_frac"]), np.mean(m > 0))
  np.testing.assert_allclose(float(got["margin_snr"]), m.mean() / m.std(), rtol=1e-9)


def test_separability_is_invariant_to_the_kernel_scale_and_survives_narrow_kernels():
  x, c, r = _embeddings()
  with jax.enable_x64(True):
    one = float(ks.kernel_separability("spectral", x, c, r, lambdas=(1.0,), alphas=(0.5,)))
    scaled = float(ks.kernel_separability("spectral", x, c, r, lambdas=(1e-30,), alphas=(0.5,)))
  np.testing.assert_allclose(scaled, one, rtol=1e-9)
  # sigma = 0.05: every kernel value is below 1e-30, still a finite statistic in float32.
  x, c, r = _embeddings(scale=3.0)
  assert np.isfinite(float(ks.kernel_separability("rbf", x, c, r, sigma=0.05)))


@pytest.mark.parametrize("name", sorted(NP_DIVERGENCES))
def test_positive_negative_divergence_equals_its_definition(name):
  n, v = 7, 6
  lc, lr = RNG.normal(size=(n, v)), RNG.normal(size=(n, v))
  want = np_pnd(name, lc, lr)
  with jax.enable_x64(True):
    got = float(ks.positive_negative_divergence(name, lc, lr, **ks.divergence_kwargs(name, CFG)))
  # Wasserstein is the loss's entropic (Sinkhorn) approximation of W1, the others are exact.
  np.testing.assert_allclose(got, want, rtol=3e-2 if name == "wasserstein" else 1e-9)


def test_pnd_is_invariant_to_the_divergence_scale():
  lc, lr = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
  with jax.enable_x64(True):
    pearson = float(ks.positive_negative_divergence("f", lc, lr, f=lambda t: (t - 1.0) ** 2))
    scaled = float(ks.positive_negative_divergence("f", lc, lr, f=lambda t: 7.0 * (t - 1.0) ** 2))
  np.testing.assert_allclose(scaled, pearson, rtol=1e-9)


def test_select_pair_is_the_argmax_of_each_axis_and_the_table_ranks_by_rank_sum():
  table, best = ks.select_pair({"a": 0.1, "b": 2.0, "c": -1.0}, {"u": 0.3, "v": 0.9})
  assert best == ("b", "v")
  assert table[0][:2] == ("b", "v") and len(table) == 6
  assert [r[2] + r[3] for r in table] == sorted(r[2] + r[3] for r in table)
  assert table[-1][:2] == ("c", "u")
  # ties keep the candidate order
  assert ks.select_pair({"a": 1.0, "b": 1.0}, {"u": 0.0})[1] == ("a", "u")


def _outputs(x, c, r, lc, lr):
  return {"prompt_embeddings": np.stack([x, x], 1), "embeddings": np.stack([c, r], 1),
          "last_logits": np.stack([lc, lr], 1)}


def test_selection_statistics_pick_follows_the_rule_on_the_numpy_statistics():
  x, c, r = _embeddings(n=10)
  lc, lr = RNG.normal(size=(10, 6)), RNG.normal(size=(10, 6)) * 2
  with jax.enable_x64(True):
    stats = ks.selection_statistics(_outputs(x, c, r, lc, lr), CFG, maha_chol=CHOL)
  want_k = {k: np_separability(K, x, c, r) for k, K in NP_KERNELS.items()}
  want_d = {d: np_pnd(d, lc, lr) for d in NP_DIVERGENCES}
  for k, v in want_k.items():
    np.testing.assert_allclose(stats["kernels"][k]["separability"], v, rtol=1e-9)
  exact = {d: v for d, v in want_d.items() if d != "wasserstein"}
  for d, v in exact.items():
    np.testing.assert_allclose(stats["divergences"][d]["pnd"], v, rtol=1e-9)
  assert stats["best"]["kernel"] == max(want_k, key=want_k.get)
  got_d = {d: v["pnd"] for d, v in stats["divergences"].items()}
  assert stats["best"]["divergence"] == max(got_d, key=got_d.get)
  assert stats["table"][0][:2] == [stats["best"]["kernel"], stats["best"]["divergence"]]
  json.dumps(stats)     # the task writes it as JSON
  assert "| polynomial |" in ks.format_statistics(stats)


def test_the_rule_picks_the_kernel_that_separates():
  """Mean shift, RBF far too narrow: only the polynomial kernel sees it. Same first and second moments
  (Gaussian vs the 4 corners (+-1, +-1)), a degree-2 polynomial cannot see it; RBF at sigma = 0.5 does."""
  cfg = {"rbf_sigma": 0.02, "poly_c": 1.0, "poly_degree": 2}
  n, rng = 60, np.random.default_rng(1)
  x = np.zeros((n, 4))
  mu = np.array([1.0, 0.0, 0.0, 0.0])
  c, r = mu + 0.3 * rng.normal(size=(n, 4)), -mu + 0.3 * rng.normal(size=(n, 4))
  lc = rng.normal(size=(n, 5))
  stats = ks.selection_statistics(_outputs(x, c, r, lc, lc + 1), cfg, kernels=("rbf", "polynomial"),
                                  divergences=("kl",))
  assert stats["best"]["kernel"] == "polynomial", stats["kernels"]
  assert stats["kernels"]["polynomial"]["separability"] > 5 * abs(stats["kernels"]["rbf"]["separability"])

  cfg = {"rbf_sigma": 0.5, "poly_c": 1.0, "poly_degree": 2}
  n = 100
  x = np.zeros((n, 2))
  c = rng.normal(size=(n, 2))
  r = rng.choice([-1.0, 1.0], size=(n, 2))
  lc = rng.normal(size=(n, 5))
  stats = ks.selection_statistics(_outputs(x, c, r, lc, lc + 1), cfg, kernels=("polynomial", "rbf"),
                                  divergences=("kl",))
  assert stats["best"]["kernel"] == "rbf", stats["kernels"]


def test_registered_for_the_loss_and_reachable_by_name():
  entry = losses.get_selection("dpo_kernels")
  assert entry.fn is ks.selection_statistics and entry.needs == {"embeddings", "last_logits"}
  with pytest.raises(ValueError, match="no pre-training selection"):
    losses.get_selection("dpo")


def test_config_select_by_picks_the_task():
  from configs import dpo_kernels
  assert dpo_kernels.get_config("select_by=metrics").task == "preselect"
  assert dpo_kernels.get_config("select_by=sweep").task == "sweep"
  assert dpo_kernels.get_config("select").task == "sweep"
  assert dpo_kernels.get_config("").task == "train"
  with pytest.raises(ValueError, match="select_by"):
    dpo_kernels.get_config("select_by=grid")


@pytest.mark.slow
def test_preselect_task_writes_the_table_before_any_training(tmp_path):
  import train_lib
  from configs import dpo_kernels
  cfg = dpo_kernels.get_config("model=tiny,smoke,select_by=metrics")
  stats = train_lib.run_task(cfg, str(tmp_path))
  saved = json.load(open(os.path.join(tmp_path, "preselect.json")))
  assert saved["best"] == stats["best"] and saved["n_pairs"] == cfg.selection.num_batches * cfg.batch_size
  assert set(saved["kernels"]) == set(losses.KERNELS) and set(saved["divergences"]) == set(losses.DIVERGENCES)
  assert all(np.isfinite(v["separability"]) for v in saved["kernels"].values())
  md = open(os.path.join(tmp_path, "preselect.md")).read()
  assert f"--config.loss.kernel={stats['best']['kernel']}" in md
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
