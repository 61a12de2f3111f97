"""Adapters against HF `peft` on the same tiny transformers Llama: initialisations, and the outputs of
adapters that PEFT saved, imported into our nodes, unmerged and merged.

The reference side (tests/ref/peft_make.py) puts each adapter on the model with `get_peft_model` (so PEFT
runs its own PiSSA / OLoRA / DoRA initialisation), records the init, moves every adapter tensor away from
it, saves the adapter and returns logits. Our side loads the same base with `models.load_hf`, runs our
initialisation with the same spec, compares it with PEFT's, then loads PEFT's saved adapter with
`peft.import_adapter` and compares logits.
"""
import json

import jax
import numpy as np
import pytest

import peft
from models import Decoder, load_hf
from tests import refenv

VOCAB = 97
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12)).astype(np.int32)
REL_TOL = 1e-5
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# "llama" (tests/ref/hf_make_model.py) has biases on every projection; "llama_linear" has none (IA3 scales
# PEFT's bias too, see peft/_ia3.py).
CASES = {
    "lora": dict(base="llama", peft_type="LORA", r=4, alpha=8, init=True,
                 targets=["q_proj", "v_proj", "down_proj", "lm_head"]),
    "rslora": dict(base="llama", peft_type="LORA", r=4, alpha=6, init=True, use_rslora=True, targets=ALL),
    "dora": dict(base="llama", peft_type="LORA", r=4, alpha=8, init=True, use_dora=True, targets=ALL),
    "gaussian": dict(base="llama", peft_type="LORA", r=4, alpha=8, init="gaussian",
                     targets=["k_proj", "o_proj", "up_proj"]),
    "pissa": dict(base="llama", peft_type="LORA", r=4, alpha=8, init="pissa", targets=ALL),
    "olora": dict(base="llama", peft_type="LORA", r=4, alpha=8, init="olora", targets=ALL),
    # PEFT's lora_bias: a trained bias on lora_B, scaled with the branch (merging needs the base biases).
    "lora_bias": dict(base="llama", peft_type="LORA", r=4, alpha=8, init=True, lora_bias=True, targets=ALL),
    "ia3": dict(base="llama_linear", peft_type="IA3", targets=["k_proj", "v_proj", "down_proj"],
                feedforward=["down_proj"]),
}

needs_ref = refenv.needs_ref


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def our_spec(case):
  method = "ia3" if case["peft_type"] == "IA3" else "dora" if case.get("use_dora") else "lora"
  init = case.get("init", True)
  spec = peft.AdapterSpec(method, rank=case.get("r", 8), alpha=case.get("alpha", 8),
                          init="default" if init is True else init, use_rslora=case.get("use_rslora", False),
                          options={"feedforward": case.get("feedforward", []),
                                   "lora_bias": case.get("lora_bias", False)})
  return {tuple(case["targets"]): spec}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  refenv.require()
  root = tmp_path_factory.mktemp("peft_parity")
  bases = sorted({c["base"] for c in CASES.values()})
  refenv.run("hf_make_model", {"tokens": TOKENS}, root=str(root), names=",".join(bases))
  cases = [dict(name=n, seed=k, **{**c, "base": str(root / c["base"])}) for k, (n, c) in enumerate(CASES.items())]
  out = refenv.run("peft_make", {"tokens": TOKENS}, root=str(root), cases=json.dumps(cases))
  models = {b: load_hf(str(root / b), dtype="float32") for b in bases}
  return root, out, models


def ours_initialised(ref, name):
  _, _, models = ref
  cfg, params = models[CASES[name]["base"]]
  return Decoder(cfg), peft.apply(params, our_spec(CASES[name]), jax.random.PRNGKey(0))


def on_peft_bases(ref, name, params):
  """params with every adapter's base replaced by PEFT's (after its init: PiSSA/OLoRA's residual), so an
  output comparison sees the same base weights and adapter weights on both sides."""
  _, out, _ = ref
  def swap(path, node):
    if not peft.is_adapter(node):
      return node
    if path == "lm_head/kernel":
      w = out[f"{name}__base__{torch_key(path, None, '')[:-1]}"].T
    else:
      w = np.stack([out[f"{name}__base__{torch_key(path, i, '')[:-1]}"].T for i in range(node.base.shape[0])])
    return node.replace(base=jax.numpy.asarray(w))
  return peft.map_with_path(swap, params, is_leaf=peft.is_adapter)


def logits(model, params):
  return np.asarray(jax.jit(model.apply)(params, TOKENS))


def torch_key(path, layer, suffix):
  module = {"lm_head/kernel": "lm_head"}.get(path)
  if module is None:
    _, parent, name, _ = path.split("/")
    module = f"model.layers.{layer}.{'self_attn' if parent == 'attn' else 'mlp'}.{name}"
  return f"base_model.model.{module}.{suffix}"


def nodes_of(params):
  return {p: n for p, n in peft._export._adapter_nodes(params).items()}


# ---------------------------------------------------------------------------------------------------
# Outputs: PEFT's saved adapters, imported, unmerged and merged
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_imported_peft_adapter_gives_peft_logits(ref, name):
  root, out, models = ref
  model, ours = ours_initialised(ref, name)
  imported = peft.import_adapter(str(root / name), on_peft_bases(ref, name, ours))
  assert type(next(iter(nodes_of(imported).values()))).__name__ == {"dora": "DoRA", "ia3": "IA3"}.get(
      name, "LoRA")
  got = logits(model, imported)
  assert rel_err(got, out[f"{name}__logits"]) <= REL_TOL
  # The adapter changes the model by far more than the tolerance, so the match is not the base's.
  assert rel_err(logits(model, peft.strip(imported)), out[f"{name}__logits"]) > 100 * REL_TOL


@pytest.mark.parity
def test_lora_bias_imported_and_initialised_as_peft(ref):
  """PEFT's lora_B.bias is read into our node (not dropped), starts at zero as PEFT's, and a biased adapter
  refuses to merge into our bias-free kernels (our kernels hold no bias to fold it into)."""
  root, out, _ = ref
  model, ours = ours_initialised(ref, "lora_bias")
  for path, node in nodes_of(ours).items():
    for i in range(node.bias.shape[0]):
      init = out[f"lora_bias__init__{torch_key(path, i, 'lora_B.bias')}"]
      assert not np.any(init) and not np.any(node.bias[i]) and node.bias[i].shape == init.shape
  imported = peft.import_adapter(str(root / "lora_bias"), on_peft_bases(ref, "lora_bias", ours))
  from safetensors.numpy import load_file
  saved = load_file(str(root / "lora_bias" / "adapter_model.safetensors"))
  for path, node in nodes_of(imported).items():
    for i in range(node.a.shape[0]):
      np.testing.assert_array_equal(node.bias[i], saved[torch_key(path, i, "lora_B.bias")])
  # Without the bias the logits are off by far more than the tolerance: the bias is in the match.
  no_bias = peft.map_with_path(lambda p, n: n.replace(bias=None) if isinstance(n, peft.LoRA) else n,
                               imported, is_leaf=peft.is_adapter)
  assert rel_err(logits(model, no_bias), out["lora_bias__logits"]) > 100 * REL_TOL
  with pytest.raises(ValueError, match="lora_bias"):
    peft.merge(imported)


@pytest.mark.parity
@pytest.mark.parametrize("name", [n for n in CASES if n != "lora_bias"])
def test_merged_equals_peft_merge_and_unload(ref, name):
  root, out, _ = ref
  model, ours = ours_initialised(ref, name)
  merged = peft.merge(peft.import_adapter(str(root / name), on_peft_bases(ref, name, ours)))
  assert not peft.has_adapters(merged)
  assert rel_err(logits(model, merged), out[f"{name}__merged"]) <= REL_TOL


# ---------------------------------------------------------------------------------------------------
# Initialisations
# ---------------------------------------------------------------------------------------------------
def _aligned(a, b, a_ref):
  """Flips the sign of each rank component (column of a, row of b) to agree with the reference's."""
  sign = np.sign(np.sum(a * a_ref, axis=0))
  return a * sign, b * sign[:, None]


@pytest.mark.parity
@pytest.mark.parametrize("name,tol", [("pissa", 1e-4), ("olora", 1e-5)])
def test_residual_inits_equal_peft(ref, name, tol):
  """The residual base and the factors (PiSSA's singular vectors up to sign) equal PEFT's.

  PiSSA's tolerance is looser for a reason of conditioning, not of formula: in float32 the top-r singular
  subspace of these random 64-96 wide matrices (s_4 / s_5 about 1.02) is determined only to about
  eps * s_1 / (s_4 - s_5) ~ 1e-5, so two correct SVDs (LAPACK in torch, XLA's in JAX) differ by that much.
  A wrong formula (a missing 1/s, a transpose, the bottom components) is off by O(1).
  """
  _, out, _ = ref
  _, ours = ours_initialised(ref, name)
  checked = 0
  for path, node in nodes_of(ours).items():
    for i in range(node.a.shape[0]):
      a_ref = out[f"{name}__init__{torch_key(path, i, 'lora_A.weight')}"].T
      b_ref = out[f"{name}__init__{torch_key(path, i, 'lora_B.weight')}"].T
      w_ref = out[f"{name}__base__{torch_key(path, i, '')[:-1]}"].T
      a, b = _aligned(np.asarray(node.a[i]), np.asarray(node.b[i]), a_ref)
      assert rel_err(a, a_ref) <= tol and rel_err(b, b_ref) <= tol, (path, i)
      assert rel_err(node.base[i], w_ref) <= tol, (path, i)
      checked += 1
  assert checked == 2 * len(ALL)


def test_pissa_moves_the_top_singular_components():
  """Sign-free statement of PiSSA: s A B is the best rank-r approximation of W, W_res the rest."""
  w = np.random.RandomState(3).normal(size=(48, 40)).astype(np.float32)
  node = peft.apply({"k": {"kernel": w}}, {"k": peft.AdapterSpec(rank=5, alpha=10, init="pissa")})["k"]["kernel"]
  u, s, vt = np.linalg.svd(w.astype(np.float64))
  top = (u[:, :5] * s[:5]) @ vt[:5]
  np.testing.assert_allclose(node.scale * np.asarray(node.a) @ np.asarray(node.b), top, atol=2e-5)
  np.testing.assert_allclose(np.asarray(node.base), w - top, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(node.a), axis=0) ** 2, s[:5] / 2.0, rtol=1e-5)


@pytest.mark.parity
def test_dora_magnitude_init_equals_peft(ref):
  _, out, _ = ref
  _, ours = ours_initialised(ref, "dora")
  for path, node in nodes_of(ours).items():
    for i in range(node.m.shape[0]):
      m_ref = out[f"dora__init__{torch_key(path, i, 'lora_magnitude_vector')}"]
      assert rel_err(node.m[i], m_ref) <= 1e-6, (path, i)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["lora", "gaussian"])
def test_random_inits_have_peft_distribution(ref, name):
  """Random draws differ between torch and JAX; their law must not: A's range (default) or spread
  (gaussian) and B = 0."""
  _, out, _ = ref
  _, ours = ours_initialised(ref, name)
  pooled, pooled_ref = [], []
  for path, node in nodes_of(ours).items():
    if path == "lm_head/kernel":
      continue
    a = np.asarray(node.a)
    a_ref = np.stack([out[f"{name}__init__{torch_key(path, i, 'lora_A.weight')}"].T for i in range(2)])
    b_ref = np.stack([out[f"{name}__init__{torch_key(path, i, 'lora_B.weight')}"] for i in range(2)])
    assert not np.any(node.b) and not np.any(b_ref)
    if name == "lora":   # U(-1/sqrt(in), 1/sqrt(in)): both maxima sit just under the bound
      bound = 1 / np.sqrt(a.shape[1])
      for x in (a, a_ref):
        assert bound * 0.9 < np.abs(x).max() <= bound
    pooled.append(a.ravel())
    pooled_ref.append(a_ref.ravel())
  if name == "gaussian":   # N(0, 1/r^2) with r = 4; ~1500 draws: the std's sampling error is ~0.005
    for x in (np.concatenate(pooled), np.concatenate(pooled_ref)):
      assert abs(x.std() - 1 / 4) < 0.02 and abs(x.mean()) < 0.03
