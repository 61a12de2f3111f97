"""RandLoRA (peft/_randlora.py).

Parity with HF peft 0.21.2 (tests/ref/peft_randlora.py, one call for the whole file):
  * forward on a chain of two linear layers with biases (one with in < out, one with in > out), the same
    base, basis and trained tensors on both sides, unmerged and merged;
  * our HF export loaded by PEFT on the tiny model gives our logits, unmerged and after merge_and_unload;
  * PEFT's saved adapter (its own torch-drawn basis in the file) imported here gives PEFT's logits.
The trainable-parameter count is checked against the paper's N (r + min(in, out)) per layer, the basis
against its regeneration from the seed, and the identity at init.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import peft
from tests import refenv
from tests.test_adapters_family_a import chain, chain_params, kernel_dims, logits, perturbed, rel_err, trainable_count

REL_TOL = 1e-5
VOCAB = 256
TOKENS = np.random.RandomState(3).randint(0, VOCAB, (2, 10)).astype(np.int32)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (dims, our spec, PEFT config kwargs). r=5 leaves a partial last basis (N r > min(in, out)).
LAYERS = {
    "randlora": ((16, 24, 8), peft.AdapterSpec("randlora", rank=4, alpha=10.0), {"r": 4, "randlora_alpha": 10}),
    "randlora_r5": ((16, 24, 8), peft.AdapterSpec("randlora", rank=5, alpha=640.0), {"r": 5, "randlora_alpha": 640}),
}
EXPORT = (ALL, peft.AdapterSpec("randlora", rank=8, alpha=16.0, options={"projection_prng_key": 3}))
IMPORT = {"r": 8, "randlora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def peft_tensors(params, n):
  """Our adapted chain as PEFT's state-dict values (keys without the adapter name)."""
  nodes = {f"l{i}": params[f"l{i}"]["kernel"] for i in range(n)}
  out = {f"{m}.{k}": v for m, node in nodes.items() for k, v in node.hf_tensors().items()}
  out.update({k.split(".")[-1]: v for k, v in peft.RandLoRA.hf_shared(nodes).items()})
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny():
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=VOCAB))
  return model, jax.jit(model.init)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
  refenv.require()
  root = tmp_path_factory.mktemp("randlora")
  model, params = tiny
  models.save_hf(str(root / "base"), model.config, params)
  arrays, cases, chains = {}, [], {}
  for k, (name, (dims, spec, config)) in enumerate(LAYERS.items()):
    ws, bs, x = chain_params(name, dims)
    small = {f"l{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in enumerate(zip(ws, bs))}
    small = perturbed(peft.apply(small, {r"l\d/kernel": spec}, jax.random.PRNGKey(k)), k)
    chains[name] = (small, x)
    arrays.update({f"{name}__w{i}": w for i, w in enumerate(ws)})
    arrays.update({f"{name}__b{i}": b for i, b in enumerate(bs)})
    arrays.update({f"{name}__t__{t}": v for t, v in peft_tensors(small, len(ws)).items()})
    arrays[f"{name}__x"] = x
    cases.append({"name": name, "peft_type": "RANDLORA", "config": config, "dims": list(dims)})
  targets, spec = EXPORT
  exported = perturbed(peft.apply(params, {targets: spec}, jax.random.PRNGKey(10)), 10)
  peft.export_adapter(str(root / "export"), exported, spec, "llama")
  loads = [{"name": "export", "base": str(root / "base"), "adapter": str(root / "export")}]
  makes = [{"name": "import", "base": str(root / "base"), "peft_type": "RANDLORA", "config": IMPORT, "seed": 0}]
  ref = refenv.run("peft_randlora", {**arrays, "tokens": TOKENS}, root=str(root), layers=json.dumps(cases),
                   loads=json.dumps(loads), makes=json.dumps(makes))
  return root, chains, exported, ref


@pytest.mark.parity
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_matches_peft_unmerged_and_merged(reference, name):
  _, chains, _, ref = reference
  params, x = chains[name]
  assert rel_err(chain(params, x, 2), ref[f"{name}__y"]) <= REL_TOL
  assert rel_err(chain(peft.merge(params), x, 2), ref[f"{name}__ym"]) <= REL_TOL
  assert rel_err(chain(peft.strip(params), x, 2), ref[f"{name}__y"]) > 100 * REL_TOL   # the adapter matters


@pytest.mark.parity
def test_export_loads_in_peft_with_our_logits(reference, tiny):
  _, _, exported, ref = reference
  model, _ = tiny
  ours = logits(model, exported)
  assert rel_err(ours, ref["export__logits"]) <= REL_TOL
  assert rel_err(ours, ref["export__merged"]) <= REL_TOL
  assert rel_err(logits(model, peft.strip(exported)), ref["export__logits"]) > 100 * REL_TOL


@pytest.mark.parity
def test_import_of_peft_adapter_gives_peft_logits(reference, tiny):
  root, _, _, ref = reference
  model, params = tiny
  imported = peft.import_adapter(str(root / "import"), params)
  assert rel_err(logits(model, imported), ref["import__logits"]) <= REL_TOL
  assert rel_err(logits(model, peft.merge(imported)), ref["import__merged"]) <= REL_TOL
  assert rel_err(logits(model, params), ref["import__logits"]) > 100 * REL_TOL


def test_trainable_count_is_n_bases_times_r_plus_min_dim(tiny):
  """The paper's count: N (r + min(in, out)) per layer with N = ceil(min(in, out) / r)."""
  model, params = tiny
  L = model.config.num_layers
  for r in (4, 5):
    want = L * sum(-(-min(i, o) // r) * (r + min(i, o)) for i, o in kernel_dims(model.config))
    assert trainable_count(params, peft.AdapterSpec("randlora", rank=r)) == want


def test_identity_at_init(tiny):
  model, params = tiny
  base = logits(model, params)
  adapted = peft.apply(params, {"all-linear": peft.AdapterSpec("randlora", rank=4, alpha=640.0)})
  assert rel_err(logits(model, adapted), base) <= 1e-6
  # PEFT's init (`reset_randlora_parameters`): lambda = 0, gamma = 1 / max(gamma.shape) = 1 / max(N, min).
  for node in (adapted["layers"]["attn"]["q_proj"]["kernel"], adapted["layers"]["mlp"]["down_proj"]["kernel"]):
    assert not np.any(np.asarray(node.lam))
    np.testing.assert_array_equal(np.asarray(node.gamma), np.float32(1.0 / max(node.gamma.shape[-2:])))
  assert rel_err(logits(model, perturbed(adapted, 0)), base) > 1e-3


def test_basis_is_regenerated_from_the_seed_and_never_trained(tiny):
  model, params = tiny
  cfg = model.config
  spec = peft.AdapterSpec("randlora", rank=4, options={"projection_prng_key": 7})
  one = peft.apply(params, {ALL: spec}, jax.random.PRNGKey(1))
  two = peft.apply(params, {ALL: spec}, jax.random.PRNGKey(2))     # the apply key plays no part
  # Sized as PEFT's: min and max of the element-wise largest (in, out) of the targets, then sliced per layer.
  dims = kernel_dims(cfg)
  largest = (max(i for i, _ in dims), max(o for _, o in dims))
  m_max, big_max = min(largest), max(largest)
  a, b = jax.jit(peft.randlora_basis, static_argnums=(0, 1, 2, 3))(7, 4, m_max, big_max)
  a_eager, b_eager = peft.randlora_basis(7, 4, m_max, big_max)
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(a_eager, np.float32))
  np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(b_eager, np.float32))
  assert a.shape == (4, m_max) and b.shape == (big_max, -(-m_max // 4), 4)
  # Unit variance (PEFT divides by the standard deviation).
  assert abs(float(np.std(np.asarray(b, np.float32))) - 1.0) < 0.05
  for mod in ("attn/q_proj", "attn/k_proj", "mlp/down_proj", "mlp/up_proj"):
    for tree in (one, two):
      node = tree["layers"][mod.split("/")[0]][mod.split("/")[1]]["kernel"]
      # Every node holds the full basis (one shared array) and reads A[:, :m], B[:M, :N] of it.
      assert node.a is tree["layers"]["attn"]["q_proj"]["kernel"].a
      np.testing.assert_array_equal(np.asarray(node.a, np.float32), np.asarray(a, np.float32))
      np.testing.assert_array_equal(np.asarray(node.b, np.float32), np.asarray(b, np.float32))
      assert node.lam.shape[-1] == -(-min(node.base.shape[-2:]) // 4)
  other = peft.apply(params, {ALL: spec.replace(options={"projection_prng_key": 8})})
  assert not np.array_equal(other["layers"]["attn"]["q_proj"]["kernel"].a, one["layers"]["attn"]["q_proj"]["kernel"].a)
  # The trainable tree (what an adapter checkpoint saves) holds lambda and gamma only.
  trainable, frozen = peft.split(one)
  assert sorted({p.split("/")[-1] for p in peft.flatten(trainable)}) == ["gamma", "lam"]
  assert {"a", "b"} <= {p.split("/")[-1] for p in peft.flatten(frozen)}
  # A gradient step never sees the basis, and both diagonals get a gradient.
  ws, bs, x = chain_params("randlora", (16, 24, 8))
  small = peft.apply({f"l{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in
                      enumerate(zip(ws, bs))}, {r"l\d/kernel": spec})
  t, f = peft.split(small)
  grads = jax.grad(lambda t: chain(peft.combine(t, f), x, 2).sum())(perturbed(t, 1))
  flat = peft.flatten(grads)
  assert sorted({p.split("/")[-1] for p in flat}) == ["gamma", "lam"]
  assert all(float(jnp.abs(g).max()) > 0 for g in flat.values())
