"""Merge methods against mergekit 0.1.5 (in .venv-ref, tests/ref/mergekit_merge.py) on tiny random models.

Two kinds of rows:
  * HF rows: flat dicts of HF-named tensors in torch layout (a 2-layer model, hidden 16); our method runs
    on the dict (no stacked layers), mergekit's `merge_tensors` on each tensor.
  * stacked rows: our own layout ([L, in, out] kernels stacked on a layer axis); mergekit gets each layer's
    torch-layout tensor (the transpose), which checks the per-layer split and the row axis of DELLA,
    filter-wise Model Stock and row-wise NuSLERP.
DARE and DELLA: mergekit samples with torch.bernoulli, which cannot reproduce our JAX masks, so the
reference script replaces torch.bernoulli by our masks (`merging.random_mask` / `merging.della_mask` with
the documented keys `fold_in(tensor_key(seed, path), i)`), and for DELLA the probabilities mergekit passed
to it are compared with ours. mergekit's `rescale: true` is our `rescale="norm"`.
Tolerance: max |ours - ref| / max |ref| per tensor, float32 inputs.
LoRA combinations (cat, svd, linear, ties_svd, magnitude_prune_svd) are compared with PEFT's
`add_weighted_adapter` on one linear layer (tests/ref/peft_lora_combine.py), through the merged delta
(SVD factors are unique only up to signs), at 1e-5.
"""
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
from tests import refenv

pytestmark = pytest.mark.parity
REL = 1e-6
D, F, V, L = 16, 24, 24, 2   # V = F: the two layouts share shapes (fewer compiles)
SEED = 3


def hf_shapes():
  s = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  for l in range(1):
    s[f"model.layers.{l}.self_attn.q_proj.weight"] = (D, D)
    s[f"model.layers.{l}.mlp.down_proj.weight"] = (D, F)
    s[f"model.layers.{l}.input_layernorm.weight"] = (D,)
  return s


def ours_shapes():
  return {"embed/embedding": (V, D), "lm_head/kernel": (D, V), "final_norm/scale": (D,),
          "layers/attn/q_proj/kernel": (L, D, D), "layers/mlp/down_proj/kernel": (L, F, D),
          "layers/attn_norm/scale": (L, D)}


def make_models(shapes, n, seed=0, scale=0.1):
  rng = np.random.default_rng(seed)
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  fts = [{k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
         for _ in range(n)]
  return base, fts


def to_torch_layers(path, x):
  """Our leaf -> [(hf-like name, torch-layout tensor)], one per layer for stacked leaves."""
  t = (lambda a: a.T) if path.endswith("kernel") else (lambda a: a)
  if path.startswith("layers/"):
    return [(f"{path}[{l}]", np.ascontiguousarray(t(x[l]))) for l in range(x.shape[0])]
  return [(path, np.ascontiguousarray(t(x)))]


# name: (method, number of fine-tunes, our params, mergekit params, uses_base, random sparsifier)
HF_CASES = {
    "linear": ("linear", 3, dict(weight=[1.0, 0.5, 2.0]), dict(weight=[1.0, 0.5, 2.0]), False, None),
    "linear_unnormalized": ("linear", 2, dict(weight=[0.3, 0.5], normalize=False),
                            dict(weight=[0.3, 0.5], normalize=False), False, None),
    "task_arithmetic": ("task_arithmetic", 3, dict(weight=[1.0, 0.5, 0.3], lambda_=0.8),
                        {"weight": [1.0, 0.5, 0.3], "lambda": 0.8}, True, None),
    "task_arithmetic_normalized": ("task_arithmetic", 2, dict(weight=[1.0, 3.0], normalize=True),
                                   dict(weight=[1.0, 3.0], normalize=True), True, None),
    "ties": ("ties", 3, dict(weight=[1.0, 0.5, 0.8], density=0.4),
             dict(weight=[1.0, 0.5, 0.8], density=0.4), True, None),
    "ties_per_model_density": ("ties", 3, dict(weight=1.0, density=[0.3, 0.5, 0.7], lambda_=1.5),
                               {"weight": 1.0, "density": [0.3, 0.5, 0.7], "lambda": 1.5}, True, None),
    "ties_rescale_norm_unnormalized": ("ties", 2, dict(weight=[1.0, 0.5], density=0.3, rescale="norm",
                                                      normalize=False),
                                       dict(weight=[1.0, 0.5], density=0.3, rescale=True, normalize=False),
                                       True, None),
    "dare_linear": ("dare_linear", 3, dict(weight=[1.0, 0.5, 0.7], density=0.5, rescale="norm"),
                    dict(weight=[1.0, 0.5, 0.7], density=0.5), True, "random"),
    "dare_ties": ("dare_ties", 3, dict(weight=[1.0, 0.5, 0.7], density=0.4, rescale="norm"),
                  dict(weight=[1.0, 0.5, 0.7], density=0.4), True, "random"),
    "dare_ties_no_rescale": ("dare_ties", 2, dict(weight=1.0, density=0.6, rescale=None, normalize=True),
                             dict(weight=1.0, density=0.6, rescale=False, normalize=True), True, "random"),
    "della": ("della", 3, dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.2, rescale="norm"),
              dict(weight=[1.0, 0.5, 0.7], density=0.5, epsilon=0.2), True, "della"),
    "della_linear": ("della_linear", 2, dict(weight=[1.0, 0.5], density=0.4, rescale="norm"),
                     dict(weight=[1.0, 0.5], density=0.4), True, "della"),
    "breadcrumbs": ("breadcrumbs", 3, dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.05),
                    dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.05), True, None),
    "breadcrumbs_large_gamma": ("breadcrumbs", 2, dict(weight=1.0, density=0.7, gamma=0.5),
                                dict(weight=1.0, density=0.7, gamma=0.5), True, None),
    "breadcrumbs_ties": ("breadcrumbs_ties", 3, dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.05),
                         dict(weight=[1.0, 0.5, 0.7], density=0.6, gamma=0.05), True, None),
    "sce": ("sce", 3, dict(select_topk=0.5), dict(select_topk=0.5), True, None),
    "sce_all": ("sce", 3, dict(), dict(), True, None),
    "slerp": ("slerp", 1, dict(t=0.3), dict(t=0.3), True, None),
    "nuslerp_base": ("nuslerp", 2, dict(weight=[1.0, 2.0]), dict(weight=[1.0, 2.0]), True, None),
    "nuslerp_no_base": ("nuslerp", 2, dict(weight=[2.0, 1.0]), dict(weight=[2.0, 1.0]), False, None),
    "nuslerp_rows": ("nuslerp", 2, dict(weight=[1.0, 1.0], flatten=False),
                     dict(weight=[1.0, 1.0], nuslerp_flatten=False), True, None),
    "nuslerp_columns": ("nuslerp", 2, dict(weight=[1.0, 3.0], flatten=False, row_wise=True),
                        dict(weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True), True, None),
    "model_stock": ("model_stock", 3, dict(), dict(), True, None),
    "model_stock_filter_wise": ("model_stock", 3, dict(filter_wise=True), dict(filter_wise=True), True, None),
    "karcher": ("karcher", 3, dict(), dict(), False, None),
    "nearswap": ("nearswap", 1, dict(t=0.1), dict(t=0.1), True, None),
}

STACKED_CASES = {
    "ties": HF_CASES["ties"],
    "della": HF_CASES["della"],
    "sce": HF_CASES["sce"],
    "breadcrumbs_ties": HF_CASES["breadcrumbs_ties"],
    "model_stock_filter_wise": HF_CASES["model_stock_filter_wise"],
    "nuslerp_rows": HF_CASES["nuslerp_rows"],
    "slerp": HF_CASES["slerp"],
}


def our_masks(case, key_path, base, xs, row_axis):
  """The masks our method samples for one tensor (same keys and deltas as merging._task_arithmetic)."""
  method, _, ours, _, _, kind = case
  key = merging.tensor_key(SEED, key_path)
  n = len(xs)
  dens = ours["density"] if isinstance(ours["density"], list) else [ours["density"]] * n
  masks, probs = [], []
  for i, x in enumerate(xs):
    k = jax.random.fold_in(key, i)
    delta = jnp.asarray(x, jnp.float32) - jnp.asarray(base, jnp.float32)
    if kind == "random":
      m, p = merging.random_mask(k, dens[i], delta.shape), None
    else:
      m, p = merging.della_mask(k, delta, dens[i], ours.get("epsilon", 0.15), row_axis)
    masks.append(np.asarray(m, np.float32))
    probs.append(None if p is None else np.asarray(p))
  return masks, probs


def build(cases, layout):
  """Runs every case on our side and prepares the reference job. -> (ours, jobs, arrays, keys)."""
  arrays, jobs, index = {}, [], []
  ours_out = {}
  for name, case in cases.items():
    method, n, ours, mk, uses_base, kind = case
    shapes = hf_shapes() if layout == "hf" else ours_shapes()
    base, fts = make_models(shapes, n, seed=len(jobs))
    fn = merging.get(method)
    out = fn(base if uses_base else None, fts, seed=SEED, stacked=None if layout == "hf" else merging.STACKED,
             **ours)
    for path in shapes:
      if layout == "hf":
        pieces = [(path, base[path], [f[path] for f in fts], out[path], -1)]
      else:
        b_l = to_torch_layers(path, base[path])
        x_l = [to_torch_layers(path, f[path]) for f in fts]
        o_l = to_torch_layers(path, np.asarray(out[path]))
        ours_b = [base[path][l] for l in range(L)] if path.startswith("layers/") else [base[path]]
        ours_x = [[f[path][l] for l in range(L)] if path.startswith("layers/") else [f[path]] for f in fts]
        pieces = []
        for j, (kp, bt) in enumerate(b_l):
          pieces.append((kp, (bt, ours_b[j]), [(x_l[i][j][1], ours_x[i][j]) for i in range(n)], o_l[j][1],
                         merging._registry.row_axis_of(path, 2)))
      for kp, b, xs, o, row_axis in pieces:
        c = len(jobs)
        b_t, b_o = b if isinstance(b, tuple) else (b, b)
        xs_t = [x[0] if isinstance(x, tuple) else x for x in xs]
        xs_o = [x[1] if isinstance(x, tuple) else x for x in xs]
        tensors = ([b_t] if uses_base else []) + xs_t
        for i, t in enumerate(tensors):
          arrays[f"c{c}_t{i}"] = np.ascontiguousarray(t)
        job = {"method": method, "n": len(tensors), "base_index": 0 if uses_base else None, "parameters": mk}
        probs = []
        if kind:
          masks, probs = our_masks(case, kp, b_o, xs_o, row_axis)
          transpose = layout != "hf" and path.endswith("kernel")
          for j, m in enumerate(masks):
            arrays[f"c{c}_m{j}"] = np.ascontiguousarray(m.T if transpose else m)
          probs = [None if p is None else (p.T if transpose else p) for p in probs]
          job["masks"] = len(masks)
        jobs.append(job)
        index.append((name, kp, np.asarray(o), probs))
  return jobs, arrays, index


def mergekit_available() -> bool:
  if not refenv.available():
    return False
  probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mergekit') is None)"
  return subprocess.run([str(refenv.REF_PYTHON), "-c", probe], check=False).returncode == 0


def run_layout(cases, layout):
  if not mergekit_available():
    pytest.skip("mergekit missing from the reference environment (.venv-ref); run `make ref-env`")
  jobs, arrays, index = build(cases, layout)
  ref = refenv.run("mergekit_merge", arrays, cases=json.dumps(jobs))
  results = {}
  for c, (name, kp, ours, probs) in enumerate(index):
    r = ref[f"c{c}_out"]
    err = float(np.abs(ours.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
    perr = 0.0
    for j, p in enumerate(probs):
      if p is not None:
        perr = max(perr, float(np.abs(p - ref[f"c{c}_p{j}"]).max()))
    results.setdefault(name, []).append((kp, err, perr))
  return results


@pytest.fixture(scope="module")
def hf_results():
  return run_layout(HF_CASES, "hf")


@pytest.fixture(scope="module")
def stacked_results():
  return run_layout(STACKED_CASES, "ours")


@pytest.mark.parametrize("name", list(HF_CASES))
def test_matches_mergekit(hf_results, name):
  for path, err, perr in hf_results[name]:
    assert err <= REL, f"{name} {path}: relative error {err:.2e}"
    assert perr <= 1e-6, f"{name} {path}: DELLA probabilities differ by {perr:.2e}"


@pytest.mark.parametrize("name", list(STACKED_CASES))
def test_stacked_layout_matches_mergekit(stacked_results, name):
  for path, err, perr in stacked_results[name]:
    assert err <= REL, f"{name} {path}: relative error {err:.2e}"
    assert perr <= 1e-6, f"{name} {path}: DELLA probabilities differ by {perr:.2e}"


# ---------------------------------------------------------------------------------------------------
# LoRA combinations against PEFT's add_weighted_adapter (peft in .venv-ref, tests/ref/peft_lora_combine.py)
# ---------------------------------------------------------------------------------------------------
LORA_RANKS, LORA_ALPHAS = (2, 3), (4.0, 3.0)
# name: (our method, our params, PEFT combination_type, PEFT extra)
LORA_CASES = {
    "cat": ("lora_cat", dict(weight=[0.7, -0.4]), "cat", {}),
    "svd": ("lora_svd", dict(weight=[0.5, 2.0], rank=3), "svd", dict(svd_rank=3)),
    "ties_svd": ("lora_ties", dict(weight=[1.0, 0.5], density=0.5, rank=4), "ties_svd",
                 dict(svd_rank=4, density=0.5)),
    "magnitude_prune_svd": ("lora_magnitude_prune", dict(weight=[1.0, 0.3], density=0.4, rank=4),
                            "magnitude_prune_svd", dict(svd_rank=4, density=0.4)),
}
LORA_LINEAR = ("lora_linear", dict(weight=[0.5, 1.5]), "linear", {})


def lora_inputs(ranks):
  rng = np.random.default_rng(11)
  return [(rng.normal(size=(7, r)).astype(np.float32), rng.normal(size=(r, 6)).astype(np.float32))
          for r in ranks]


def run_lora_cases(cases, ranks, alphas):
  ins = lora_inputs(ranks)
  arrays = {f"{k}{i}": f for i, (a, b) in enumerate(ins) for k, f in (("a", a), ("b", b))}
  jobs = [dict(combination_type=ct, weights=ours["weight"], alphas=list(alphas), **extra)
          for _, ours, ct, extra in cases.values()]
  ref = refenv.run("peft_lora_combine", arrays, cases=json.dumps(jobs))
  loras = [{"w": (a, b, alpha / r)} for (a, b), alpha, r in zip(ins, alphas, ranks)]
  errs = {}
  for c, (name, (method, ours, _, _)) in enumerate(cases.items()):
    a, b = merging.get(method)(loras, **ours)["w"]
    got, exp = np.asarray(a, np.float64) @ np.asarray(b, np.float64), ref[f"delta{c}"]
    errs[name] = float(np.abs(got - exp).max() / np.abs(exp).max())
  return errs


@pytest.fixture(scope="module")
def lora_results():
  if not refenv.available():
    pytest.skip("reference environment (.venv-ref) missing")
  errs = run_lora_cases(LORA_CASES, LORA_RANKS, LORA_ALPHAS)
  errs.update(run_lora_cases({"linear": LORA_LINEAR}, (3, 3), (6.0, 3.0)))   # linear needs equal ranks
  return errs


@pytest.mark.parametrize("name", list(LORA_CASES) + ["linear"])
def test_lora_combination_matches_peft(lora_results, name):
  assert lora_results[name] <= 1e-5, f"{name}: relative error {lora_results[name]:.2e}"
