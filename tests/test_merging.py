"""merging/: identities, the shared sparsify/consensus steps, the registry and per-path parameters, formula
checks of the methods mergekit lacks against float64 numpy written here, LoRA combinations, and the
streaming checkpoint merge against the in-memory one. Parity with mergekit: test_merging_parity.py."""
import ast
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import merging
from merging._streaming import CheckpointReader

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, F, V, L = 8, 12, 16, 2


def tree(seed, scale=1.0, base=None):
  rng = np.random.default_rng(seed)
  shapes = {"embed": {"embedding": (V, D)}, "final_norm": {"scale": (D,)},
            "layers": {"attn": {"q_proj": {"kernel": (L, D, D)}}, "mlp": {"down_proj": {"kernel": (L, F, D)}},
                       "attn_norm": {"scale": (L, D)}}}
  flat = merging.flatten(shapes)
  out = {}
  for p, s in flat.items():
    x = scale * rng.normal(size=s).astype(np.float32)
    out[p] = (x if base is None else merging.flatten(base)[p] + x).astype(np.float32)
  return merging.unflatten(out)


BASE = tree(0)
FTS = [tree(i, 0.1, BASE) for i in (1, 2, 3)]


def flat_np(t):
  return {k: np.asarray(v, np.float64) for k, v in merging.flatten(t).items()}


def assert_tree_close(a, b, rtol=1e-6, exact=False):
  fa, fb = merging.flatten(a), merging.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64)
    if exact:
      np.testing.assert_array_equal(x, y, err_msg=k)
    else:
      np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-30), err_msg=k)


# ---------------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------------
SMALL = {"embed": {"embedding": merging.flatten(FTS[0])["embed/embedding"]},
         "layers": {"attn": {"q_proj": {"kernel": merging.flatten(FTS[0])["layers/attn/q_proj/kernel"]}}},
         "final_norm": {"scale": merging.flatten(FTS[0])["final_norm/scale"]}}


SELF_CASES = {   # method: (models given, params); every one of them must return the model itself
    "linear": (2, {}), "task_arithmetic": (2, {}), "ties": (2, dict(density=0.3)),
    "dare_linear": (2, dict(density=0.5)), "dare_ties": (2, dict(density=0.5)),
    "della": (2, dict(density=0.5)), "della_linear": (2, dict(density=0.5)),
    "breadcrumbs": (2, dict(density=0.5)), "breadcrumbs_ties": (2, dict(density=0.5)),
    "sce": (2, dict(select_topk=0.5)), "slerp": (1, dict(t=0.3)), "nuslerp": (2, {}),
    "model_stock": (2, {}), "karcher": (3, {}), "nearswap": (1, dict(t=0.1)), "tsv_m": (2, {}),
    "pcb": (2, dict(density=0.2)), "compeft": (2, dict(density=0.2)),
    "fisher": (2, dict(fisher=[jax.tree.map(np.abs, SMALL), jax.tree.map(np.square, SMALL)])),
}


@pytest.mark.parametrize("name", list(SELF_CASES))
def test_merging_a_model_with_itself_returns_it(name):
  n, params = SELF_CASES[name]
  x = SMALL
  out = merging.get(name)(x, [x] * n, **params)
  assert_tree_close(out, x, rtol=1e-6)


@pytest.mark.parametrize("name,params", [
    ("task_arithmetic", {}), ("ties", dict(density=1.0)), ("dare_linear", dict(density=1.0)),
    ("dare_ties", dict(density=1.0)), ("breadcrumbs", dict(density=1.0)),
    ("breadcrumbs_ties", dict(density=1.0)), ("della", dict(density=1.0)), ("tsv_m", {}),
    ("compeft", dict(density=1.0, replace_factor=-1))])
def test_weight_one_on_one_model_returns_it(name, params):
  weight = {} if name == "tsv_m" else dict(weight=1.0)
  out = merging.get(name)(BASE, [FTS[1]], **weight, **params)
  assert_tree_close(out, FTS[1], rtol=1e-6)


def test_linear_weight_one_and_zero_is_exact():
  assert_tree_close(merging.linear(None, [FTS[0], FTS[1]], weight=[1.0, 0.0]), FTS[0], exact=True)


def test_adapter_nodes_are_folded_in_before_merging():
  import peft
  w = SMALL["layers"]["attn"]["q_proj"]["kernel"]
  node = peft.LoRA(base=w, a=np.ones(w.shape[:-1] + (2,), np.float32),
                   b=np.full((w.shape[0], 2, w.shape[-1]), 0.1, np.float32), scale=0.5)
  with_lora = jax.tree.map(lambda x: x, SMALL)
  with_lora["layers"] = {"attn": {"q_proj": {"kernel": node}}}
  out = merging.linear(None, [with_lora, SMALL], weight=[1.0, 0.0])
  np.testing.assert_allclose(out["layers"]["attn"]["q_proj"]["kernel"], w + 0.5 * 2 * 0.1, rtol=1e-6)


def test_bfloat16_in_bfloat16_out():
  b16 = lambda t: jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), t)
  out = merging.ties(b16(SMALL), [b16(SMALL), b16(jax.tree.map(lambda x: x + 1, SMALL))], density=0.5)
  assert all(np.asarray(x).dtype == ml_dtypes.bfloat16 for x in merging.flatten(out).values())


# ---------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------
def test_topk_mask_is_exact_with_ties():
  x = jnp.asarray(np.repeat(np.arange(10, dtype=np.float32), 7))   # every value 7 times
  for k in (0, 1, 6, 7, 8, 33, 69, 70):
    m = np.asarray(merging.topk_mask(x, k))
    assert m.sum() == k
    if k:
      assert np.asarray(x)[m].min() >= np.sort(np.asarray(x))[::-1][k - 1]
  y = jnp.asarray(np.random.default_rng(0).normal(size=(13, 7)).astype(np.float32))
  for k in (1, 20, 90):
    np.testing.assert_array_equal(np.sort(np.asarray(y)[np.asarray(merging.topk_mask(y, k))]),
                                  np.sort(np.asarray(y).ravel())[-k:])
  assert float(merging.kth_smallest(y, 5)) == np.sort(np.asarray(y).ravel())[5]


def test_magnitude_and_outlier_masks():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(20, 10)).astype(np.float32))
  a = np.abs(np.asarray(x)).ravel()
  order = np.argsort(a)
  m = np.asarray(merging.magnitude_mask(x, 0.3)).ravel()
  assert set(np.flatnonzero(m)) == set(order[-60:])
  m = np.asarray(merging.magnitude_outliers_mask(x, 0.5, gamma=0.1)).ravel()   # keep ranks [80, 180)
  assert set(np.flatnonzero(m)) == set(order[80:180])
  m = np.asarray(merging.magnitude_outliers_mask(x, 0.7, gamma=0.5)).ravel()   # gamma >= 1 - density
  assert set(np.flatnonzero(m)) == set(order[:140])


def test_della_probabilities_follow_the_rank_along_the_row_axis():
  x = np.random.default_rng(2).normal(size=(4, 9)).astype(np.float32)
  p = np.asarray(merging.della_probs(jnp.asarray(x), 0.5, 0.2, row_axis=-1))
  ranks = np.argsort(np.argsort(np.abs(x), axis=1), axis=1)
  np.testing.assert_allclose(p, 0.3 + 0.4 * ranks / 8, rtol=1e-6)
  pt = np.asarray(merging.della_probs(jnp.asarray(x.T), 0.5, 0.2, row_axis=-2))
  np.testing.assert_allclose(pt, p.T, rtol=1e-6)
  with pytest.raises(ValueError):
    merging.della_probs(jnp.asarray(x), 0.9, 0.15)


def test_rescale_rules():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(50,)).astype(np.float32))
  m = jnp.arange(50) % 3 == 0
  np.testing.assert_allclose(merging.rescale_masked(x, m, "density", 0.25), np.where(m, x, 0) / 0.25, rtol=1e-6)
  r = merging.rescale_masked(x, m, "norm")
  np.testing.assert_allclose(float(jnp.abs(r).sum()), float(jnp.abs(x).sum()), rtol=1e-5)
  np.testing.assert_array_equal(merging.rescale_masked(x, m, None), np.where(m, x, 0))


def test_dare_density_rescale_is_m_tau_over_p():
  out = merging.dare_linear(BASE, FTS[:2], weight=[1.0, 0.5], density=0.4, seed=5)
  b, f0, f1 = (merging.flatten(t) for t in (BASE, FTS[0], FTS[1]))
  path = "embed/embedding"
  key = merging.tensor_key(5, path)
  exp = np.asarray(b[path], np.float64)
  for i, (f, w) in enumerate(zip((f0, f1), (1.0, 0.5))):
    m = np.asarray(merging.random_mask(jax.random.fold_in(key, i), 0.4, b[path].shape))
    exp = exp + w * m * (f[path] - b[path]) / 0.4
  np.testing.assert_allclose(merging.flatten(out)[path], exp, rtol=1e-5, atol=1e-6)
  # Kept fraction and unbiasedness, over a large tensor.
  big = jnp.ones((400, 400))
  m = merging.random_mask(jax.random.key(0), 0.3, big.shape)
  assert abs(float(m.mean()) - 0.3) < 0.01
  assert abs(float(merging.sparsify(big, 0.3, "random", key=jax.random.key(0), rescale="density").mean()) - 1) < 0.03


def test_sign_election_and_disjoint_mean():
  d = jnp.asarray([[1.0, -2.0, 0.0, 1.0], [-3.0, 1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(merging.elect_sign(d, "sum"), [-1, -1, 1, 1])
  np.testing.assert_array_equal(merging.elect_sign(d, "count"), [1, 1, 1, 1])
  mask = merging.agreement(d, "sum")
  np.testing.assert_array_equal(mask, [[0, 1, 0, 1], [1, 0, 0, 0]])
  w = jnp.asarray([1.0, 2.0])
  np.testing.assert_allclose(merging.disjoint_mean(d, w, mask), [-1.5, -2.0, 0.0, 1.0])
  np.testing.assert_allclose(merging.disjoint_mean(d, w, mask, divide_by="count"), [-3.0, -2.0, 0.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# Registry, per-path parameters, stacked layers
# ---------------------------------------------------------------------------------------------------
def test_registry():
  for n in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
            "breadcrumbs", "breadcrumbs_ties", "sce", "slerp", "nuslerp", "model_stock", "karcher", "nearswap",
            "fisher", "pcb", "tsv_m", "compeft", "lora_lego", "lora_cat", "lora_svd", "lora_linear",
            "lora_ties", "lora_dare_linear", "lora_dare_ties", "lora_magnitude_prune"):
    assert n in merging.names()
  assert merging.get("ties") is merging.ties
  with pytest.raises(KeyError):
    merging.get("nope")
  with pytest.raises(TypeError, match="unknown parameter"):
    merging.ties(BASE, FTS, densty=0.2)
  with pytest.raises(ValueError, match="needs a base"):
    merging.ties(None, FTS)


def test_shape_mismatch_is_named():
  other = jax.tree.map(lambda x: x, SMALL)
  other["embed"] = {"embedding": np.zeros((V + 2, D), np.float32)}
  with pytest.raises(ValueError, match="embed/embedding has different shapes"):
    merging.ties(SMALL, [other])


def test_regex_parameters_first_full_match_wins():
  rules = {"embed/.*": 1.0, "layers/attn/.*": 0.3, ".*": 0.5}
  out = merging.flatten(merging.ties(BASE, FTS[:1], density=rules))
  f = merging.flatten(FTS[0])
  np.testing.assert_allclose(out["embed/embedding"], f["embed/embedding"], rtol=1e-6)   # density 1
  for path, dens in (("layers/attn/q_proj/kernel", 0.3), ("layers/mlp/down_proj/kernel", 0.5)):
    b = merging.flatten(BASE)[path]
    kept = np.asarray(out[path] != b)
    assert kept[0].sum() == int(dens * kept[0].size)      # per layer
  # Per-model lists inside rules, and mergekit's name `lambda`.
  out2 = merging.task_arithmetic(BASE, FTS[:2], weight={"embed/.*": [1.0, 0.0], ".*": [0.0, 1.0]},
                                 **{"lambda": 1.0})
  o2 = merging.flatten(out2)
  np.testing.assert_allclose(o2["embed/embedding"], f["embed/embedding"], rtol=1e-6)
  np.testing.assert_allclose(o2["final_norm/scale"], merging.flatten(FTS[1])["final_norm/scale"], rtol=1e-6)
  with pytest.raises(KeyError, match="no parameter rule"):
    merging.ties(BASE, FTS, density={"embed/.*": 0.5})


def test_stacked_layers_merge_layer_by_layer():
  path = "layers/attn/q_proj/kernel"
  base, fts = {path: merging.flatten(BASE)[path]}, [{path: merging.flatten(f)[path]} for f in FTS]
  out = merging.ties(base, fts, density=0.25)
  for l in range(L):
    one = merging.ties({"w": base[path][l]}, [{"w": f[path][l]} for f in fts], density=0.25, stacked=None)
    np.testing.assert_array_equal(out[path][l], one["w"])
  whole = merging.ties(base, fts, density=0.25, stacked=None)[path]
  assert not np.array_equal(whole, out[path])    # one top-k over both layers differs


def test_randomness_is_deterministic_per_seed_and_path():
  a = merging.flatten(merging.dare_ties(BASE, FTS, density=0.3, seed=1))
  b = merging.flatten(merging.dare_ties(BASE, FTS, density=0.3, seed=1))
  c = merging.flatten(merging.dare_ties(BASE, FTS, density=0.3, seed=2))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["embed/embedding"], c["embed/embedding"])


def test_package_imports_only_jax_numpy_and_public_project_names():
  allowed_third = {"jax", "numpy", "safetensors", "ml_dtypes"}   # the last two only in _streaming, lazily
  stdlib = {"__future__", "dataclasses", "functools", "inspect", "re", "zlib", "collections", "typing", "math",
            "json", "os", "shutil", "struct"}
  for file in (ROOT / "merging").glob("*.py"):
    for node in ast.walk(ast.parse(file.read_text())):
      mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
          [node.module] if isinstance(node, ast.ImportFrom) else [])
      for mod in mods:
        top = mod.split(".")[0]
        assert top in allowed_third | stdlib | {"merging", "peft", "models"}, (file.name, mod)
        if top in ("peft", "models"):
          assert mod == top and isinstance(node, ast.Import), (file.name, mod)


# ---------------------------------------------------------------------------------------------------
# Formula checks in float64 (methods mergekit lacks)
# ---------------------------------------------------------------------------------------------------
def test_fisher_merge_formula():
  fishers = [tree(10 + i, 1.0) for i in range(3)]
  fishers = [jax.tree.map(lambda x: np.abs(x) * (np.abs(x) > 0.5), f) for f in fishers]   # exact zeros too
  w = [1.0, 0.5, 2.0]
  for favor in (True, False):
    out = merging.flatten(merging.fisher(None, FTS, fisher=fishers, weight=w, favor_target_model=favor))
    fl, ff = [flat_np(t) for t in FTS], [flat_np(t) for t in fishers]
    for k in out:
      fs = [np.maximum(f[k], 1e-6) if (not favor or i == 0) else f[k] for i, f in enumerate(ff)]
      exp = sum(wi * f * x[k] for wi, f, x in zip(w, fs, fl)) / sum(wi * f for wi, f in zip(w, fs))
      np.testing.assert_allclose(out[k], exp, rtol=0, atol=1e-6 * np.abs(exp).max())


def test_fisher_diagonal_matches_the_analytic_gradient():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  batches = [{"x": rng.normal(size=(3, 5)).astype(np.float32)} for _ in range(2)]

  def log_prob_fn(p, batch, key):
    logits = batch["x"] @ p["w"] + p["b"]
    y = jax.random.categorical(key, jax.lax.stop_gradient(logits))
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

  rng_key = jax.random.key(4)
  fisher = merging.fisher_diagonal(log_prob_fn, params, batches, rng_key)
  fw, fb, n = np.zeros((5, 4)), np.zeros(4), 0
  for bi, batch in enumerate(batches):
    for j in range(3):
      x = batch["x"][j:j + 1]
      key = jax.random.fold_in(jax.random.fold_in(rng_key, bi), j)
      y = int(jax.random.categorical(key, jnp.asarray(x) @ params["w"] + params["b"])[0])
      logits = x[0].astype(np.float64) @ params["w"] + params["b"]
      p = np.exp(logits - logits.max()); p /= p.sum()
      g = -p; g[y] += 1
      fw += np.outer(x[0], g) ** 2; fb += g ** 2; n += 1
  np.testing.assert_allclose(fisher["w"], fw / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fisher["b"], fb / n, rtol=1e-5, atol=1e-7)


def pcb_numpy(tau, density, clip=1e-4):
  n, d = tau.shape
  a = np.abs(tau)
  s = np.sort(a, axis=1)
  a = np.clip(a, s[:, int(d * clip)][:, None], s[:, int(d * (1 - clip)) - 1][:, None])
  clipped = np.sign(tau) * a
  norm = lambda x: (x - x.min(1, keepdims=True)) / (x.max(1, keepdims=True) - x.min(1, keepdims=True))
  score = np.exp(n * norm(a) ** 2) * np.tanh(tau * tau.sum(0, keepdims=True))
  b = norm(np.maximum(score, np.sort(score, axis=1)[:, int(d * (1 - density))][:, None]))
  return (clipped * b).sum(0) / np.maximum(b.sum(0), 1e-12)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_pcb_formula(per_tensor):
  out = merging.flatten(merging.pcb(BASE, FTS, density=0.2, lambda_=1.2, per_tensor=per_tensor))
  b, fl = flat_np(BASE), [flat_np(t) for t in FTS]
  groups = [[k] for k in b] if per_tensor else [list(b)]
  for g in groups:
    tau = np.stack([np.concatenate([(f[k] - b[k]).ravel() for k in g]) for f in fl])
    merged, off = pcb_numpy(tau, 0.2), 0
    for k in g:
      exp = b[k] + 1.2 * merged[off:off + b[k].size].reshape(b[k].shape)
      off += b[k].size
      np.testing.assert_allclose(out[k], exp, rtol=0, atol=1e-5 * np.abs(exp).max(), err_msg=k)


def tsv_numpy(base, xs):
  taus = [x - base for x in xs]
  if base.ndim != 2:
    return base + sum(taus) / len(taus)
  k = int(min(base.shape) * (1.0 / len(taus)))
  us, ss, vs = [], [], []
  for t in taus:
    u, s, vt = np.linalg.svd(t, full_matrices=False)
    us.append(u[:, :k]); ss.append(s[:k]); vs.append(vt[:k])
  polar = lambda m: (lambda u, s, vt: u @ vt)(*np.linalg.svd(m, full_matrices=False))
  return base + polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ polar(np.concatenate(vs, 0))


def test_tsv_m_formula():
  out = merging.flatten(merging.tsv_m(BASE, FTS, lambda_=1.0))
  b, fl = flat_np(BASE), [flat_np(t) for t in FTS]
  for k in b:
    if k.startswith("layers/"):
      exp = np.stack([tsv_numpy(b[k][l], [f[k][l] for f in fl]) for l in range(L)])
    else:
      exp = tsv_numpy(b[k], [f[k] for f in fl])
    np.testing.assert_allclose(out[k], exp, rtol=0, atol=2e-5 * np.abs(exp).max(), err_msg=k)


@pytest.mark.parametrize("replace_factor", [1.5, -1, -2])
def test_compeft_formula(replace_factor):
  out = merging.flatten(merging.compeft(BASE, FTS[:2], weight=[1.0, 0.5], density=0.3,
                                        replace_factor=replace_factor, lambda_=0.9))
  b, fl = flat_np(BASE), [flat_np(t) for t in FTS[:2]]
  keys = list(b)
  exp = {k: b[k].copy() for k in keys}
  for f, w in zip(fl, (1.0, 0.5)):
    tau = np.concatenate([(f[k] - b[k]).ravel() for k in keys])
    keep = np.zeros(tau.size, bool)
    keep[np.argsort(-np.abs(tau))[:int(0.3 * tau.size)]] = True
    if replace_factor == -1:
      comp = np.where(keep, tau, 0)
    else:
      alpha = np.abs(tau[keep]).mean() if replace_factor == -2 else replace_factor * tau.std(ddof=1)
      comp = np.where(keep, np.sign(tau) * alpha, 0)
    off = 0
    for k in keys:
      exp[k] += 0.9 * w * comp[off:off + b[k].size].reshape(b[k].shape)
      off += b[k].size
  for k in keys:
    np.testing.assert_allclose(out[k], exp[k], rtol=0, atol=2e-6 * np.abs(exp[k]).max(), err_msg=k)


# ---------------------------------------------------------------------------------------------------
# LoRA combinations
# ---------------------------------------------------------------------------------------------------
def loras(seed, ranks=(2, 3), lead=()):
  rng = np.random.default_rng(seed)
  out = []
  for i, r in enumerate(ranks):
    out.append({"layers/attn/q_proj/kernel": (rng.normal(size=lead + (6, r)).astype(np.float32),
                                              rng.normal(size=lead + (r, 5)).astype(np.float32), 0.5 + i),
                "lm_head/kernel": (rng.normal(size=(6, r)).astype(np.float32),
                                   rng.normal(size=(r, 7)).astype(np.float32))})
  return out


def np_delta(entry, w=1.0):
  a, b, *s = entry
  return w * (s[0] if s else 1.0) * np.einsum("...ir,...ro->...io", a.astype(np.float64), b.astype(np.float64))


def test_lora_cat_equals_the_weighted_sum_of_deltas():
  ls, w = loras(0, lead=(2,)), [0.7, -0.4]
  out = merging.lora_cat(ls, weight=w)
  for k in out:
    a, b = out[k]
    assert a.shape[-1] == 5
    exp = sum(np_delta(l[k], wi) for l, wi in zip(ls, w))
    np.testing.assert_allclose(np.einsum("...ir,...ro->...io", a, b), exp, rtol=0, atol=1e-6 * np.abs(exp).max())


def test_lora_svd_is_the_truncated_svd_of_the_weighted_sum():
  ls, w = loras(1), [0.5, 2.0]
  full = merging.lora_svd(ls, weight=w, rank=5)
  trunc = merging.lora_svd(ls, weight=w, rank=2)
  for k in full:
    exp = sum(np_delta(l[k], wi) for l, wi in zip(ls, w))
    np.testing.assert_allclose(np.asarray(full[k][0]) @ np.asarray(full[k][1]), exp, rtol=0,
                               atol=1e-5 * np.abs(exp).max())
    u, s, vt = np.linalg.svd(exp, full_matrices=False)
    np.testing.assert_allclose(np.asarray(trunc[k][0]) @ np.asarray(trunc[k][1]), (u[:, :2] * s[:2]) @ vt[:2],
                               rtol=0, atol=1e-5 * np.abs(exp).max())


def test_lora_linear_is_peft_sqrt_weighting():
  ls, w = loras(2, ranks=(3, 3)), [0.5, -2.0]
  out = merging.lora_linear(ls, weight=w)
  for k in out:
    ws = [wi * (l[k][2] if len(l[k]) > 2 else 1.0) for wi, l in zip(w, ls)]
    a = sum(np.sign(x) * np.sqrt(abs(x)) * l[k][0] for x, l in zip(ws, ls))
    b = sum(np.sqrt(abs(x)) * l[k][1] for x, l in zip(ws, ls))
    np.testing.assert_allclose(out[k][0], a, rtol=0, atol=1e-6 * np.abs(a).max())
    np.testing.assert_allclose(out[k][1], b, rtol=0, atol=1e-6 * np.abs(b).max())


def test_lora_ties_follows_peft_on_the_deltas():
  ls, w = loras(3), [1.0, 0.5]
  out = merging.lora_ties(ls, weight=w, density=0.5, rank=5)
  for k in out:
    ds = [np_delta(l[k]) for l in ls]
    pruned = []
    for d in ds:
      keep = np.zeros(d.size, bool)
      keep[np.argsort(-np.abs(d).ravel())[:int(0.5 * d.size)]] = True
      pruned.append(np.where(keep.reshape(d.shape), d, 0))
    t = np.stack(pruned)
    sign = np.where(t.sum(0) >= 0, 1, -1)
    mask = np.sign(t) == sign
    mixed = (t * np.asarray(w)[:, None, None] * mask).sum(0) / np.maximum(mask.sum(0), 1)
    u, s, vt = np.linalg.svd(mixed, full_matrices=False)
    exp = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(np.asarray(out[k][0]) @ np.asarray(out[k][1]), exp, rtol=0,
                               atol=1e-5 * np.abs(exp).max())


@pytest.mark.parametrize("reweight", [False, True])
def test_lora_lego_clusters_rank_one_units(reweight):
  rng = np.random.default_rng(5)
  centers = rng.normal(size=(3, 11)) * 5
  ls = []
  for i in range(2):
    units = centers + 0.01 * rng.normal(size=centers.shape)
    perm = rng.permutation(3)
    units = units[perm]
    ls.append({"w": (units[:, :6].T.astype(np.float32), units[:, 6:].astype(np.float32))})
  out = merging.lora_lego(ls, k=3, reweight=reweight)
  a, b = np.asarray(out["w"][0]), np.asarray(out["w"][1])
  assert a.shape == (6, 3) and b.shape == (3, 5)
  members = [[] for _ in range(3)]
  for l in ls:
    ua, ub = l["w"][0].T.astype(np.float64), l["w"][1].astype(np.float64)
    for j in range(3):
      c = int(np.argmin(np.linalg.norm(centers - np.concatenate([ua[j], ub[j]]), axis=1)))
      members[c].append((ua[j], ub[j]))
  exp = np.zeros((6, 5))
  for mem in members:
    ca, cb = np.mean([m[0] for m in mem], 0), np.mean([m[1] for m in mem], 0)
    if reweight:
      ca *= np.mean([np.linalg.norm(m[0]) for m in mem]) / np.linalg.norm(ca)
      cb *= np.mean([np.linalg.norm(m[1]) for m in mem]) / np.linalg.norm(cb)
    exp += np.outer(ca, cb)
  np.testing.assert_allclose(a @ b, exp, rtol=0, atol=1e-5 * np.abs(exp).max())


def test_lora_factors_accept_peft_nodes():
  import peft
  node = peft.LoRA(base=np.zeros((6, 5), np.float32), a=np.ones((6, 2), np.float32),
                   b=np.full((2, 5), 0.5, np.float32), scale=2.0)
  (a, b), = merging.lora_cat([{"w": node}]).values()
  np.testing.assert_allclose(np.asarray(a) @ np.asarray(b), np.full((6, 5), 2.0))


# ---------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------
HF_SHAPES = {"model.embed_tokens.weight": (V, D), "model.layers.0.self_attn.q_proj.weight": (D, D),
             "model.layers.0.mlp.down_proj.weight": (D, F), "model.layers.0.input_layernorm.weight": (D,),
             "model.norm.weight": (D,), "lm_head.weight": (V, D)}


def write_hf(path, seed, dtype, base=None, shard=None):
  rng = np.random.default_rng(seed)
  t = {k: (rng.normal(size=s) * (0.1 if base is not None else 1) + (0 if base is None else
           base[k].astype(np.float32))).astype(dtype) for k, s in HF_SHAPES.items()}
  os.makedirs(path, exist_ok=True)
  names = list(t)
  halves = [names[:3], names[3:]] if shard else [names]
  wm = {}
  for i, h in enumerate(halves):
    f = f"model-{i + 1:05d}-of-{len(halves):05d}.safetensors"
    save_file({k: t[k] for k in h}, os.path.join(path, f), metadata={"format": "pt"})
    wm.update({k: f for k in h})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": wm}, f)
  for name in ("config.json", "tokenizer.json"):
    with open(os.path.join(path, name), "w") as f:
      json.dump({"from": seed}, f)
  return t


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("method,params", [
    ("ties", dict(density=0.4, weight=[1.0, 0.5])), ("dare_ties", dict(density=0.5, seed=3)),
    ("compeft", dict(density=0.3)), ("linear", dict(weight={"lm_head.*": [1.0, 0.0], ".*": [1.0, 1.0]}))])
def test_merge_checkpoints_matches_the_in_memory_merge(tmp_path, dtype, method, params):
  base = write_hf(tmp_path / "base", 0, dtype)
  fts = [write_hf(tmp_path / f"ft{i}", i + 1, dtype, base, shard=i == 0) for i in range(2)]
  out = merging.merge_checkpoints(method, str(tmp_path / "base"), [str(tmp_path / "ft0"), str(tmp_path / "ft1")],
                                  str(tmp_path / "out"), max_shard_bytes=V * D * np.dtype(dtype).itemsize + 1,
                                  **params)
  files = sorted(os.listdir(out))
  assert "config.json" in files and "tokenizer.json" in files and "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) >= 2
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == {"from": 0}
  got = CheckpointReader(out)
  exp = merging.get(method)(base, fts, stacked=None, **params)
  assert set(got.names()) == set(HF_SHAPES)
  for k in HF_SHAPES:
    x = got.get(k)
    assert x.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(x.astype(np.float32), np.asarray(exp[k]).astype(np.float32), err_msg=k)
