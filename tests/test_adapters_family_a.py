"""VeRA, NOLA, HRA and MiSS/Bone (peft/_vera.py, _nola.py, _hra.py, _miss.py).

Parity with HF peft 0.21.2 (tests/ref/peft_family_a.py, one call for the whole file):
  * forward on a chain of two linear layers with biases, unmerged and merged, every mode;
  * our HF export loaded by PEFT on the tiny model gives our logits, unmerged and after merge_and_unload;
  * PEFT's saved adapter imported here gives PEFT's logits.
NOLA (not in PEFT) is checked against a float64 evaluation of its formula. Trainable-parameter counts are
checked against each paper's formula, and the identity at init where the method starts there.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import peft
from tests import refenv

REL_TOL = 1e-5
VOCAB = 256
TOKENS = np.random.RandomState(3).randint(0, VOCAB, (2, 10)).astype(np.int32)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def perturbed(params, seed):
  """Every trainable adapter tensor moved off its init."""
  rng = np.random.RandomState(seed)
  def move(node):
    if not peft.is_adapter(node):
      return node
    return node.replace(**{f: getattr(node, f) + 0.1 * rng.normal(size=getattr(node, f).shape).astype(np.float32)
                           for f in node.trainable_fields})
  return jax.tree.map(move, params, is_leaf=peft.is_adapter)


# ---- single layers: a chain l0 -> l1 of linear layers with biases --------------------------------------
# name -> (dims, our spec, PEFT type, PEFT config kwargs)
LAYERS = {
    "vera": ((16, 24, 8), peft.AdapterSpec("vera", rank=4), "VERA", {"r": 4}),
    "hra": ((16, 24, 8), peft.AdapterSpec("hra", rank=4), "HRA", {"r": 4}),
    "hra_gs": ((16, 24, 8), peft.AdapterSpec("hra", rank=3, options={"apply_GS": True, "init_weights": False}),
               "HRA", {"r": 3, "apply_GS": True, "init_weights": False}),
    "miss": ((18, 24, 8), peft.AdapterSpec("miss", rank=4), "MISS", {"r": 4}),     # 18 % 4: a partial block
    "miss_bat": ((16, 24, 8), peft.AdapterSpec("miss", rank=4, options={"mode": "bat"}), "MISS",
                 {"r": 4, "init_weights": "bat"}),
    "miss_mini": ((16, 24, 8), peft.AdapterSpec("miss", rank=4, options={"mode": "mini", "mini_r": 4}), "MISS",
                  {"r": 4, "init_weights": "mini", "mini_r": 4}),
    "bone": ((16, 24, 8), peft.AdapterSpec("bone", rank=4), "MISS", {"r": 4}),
}


def chain_params(name, dims):
  rng = np.random.RandomState(len(name))
  ws = [rng.normal(0, 0.3, (dims[i + 1], dims[i])).astype(np.float32) for i in range(len(dims) - 1)]
  bs = [rng.normal(0, 0.2, (dims[i + 1],)).astype(np.float32) for i in range(len(dims) - 1)]
  x = rng.normal(size=(5, dims[0])).astype(np.float32)
  return ws, bs, x


def chain(params, x, n):
  for i in range(n):
    x = peft.dot(x, params[f"l{i}"]["kernel"]) + params[f"l{i}"]["bias"]
  return x


def peft_tensors(params, n):
  """Our adapted chain as PEFT's state-dict values (keys without the adapter name)."""
  out = {}
  for i in range(n):
    node = params[f"l{i}"]["kernel"]
    if isinstance(node, peft.VeRA):
      out.update({f"l{i}.vera_lambda_d": node.lambda_d, f"l{i}.vera_lambda_b": node.lambda_b})
    else:
      out.update({f"l{i}.{k}": v for k, v in node.hf_tensors().items()})
  if isinstance(params["l0"]["kernel"], peft.VeRA):
    nodes = {f"l{i}": params[f"l{i}"]["kernel"] for i in range(n)}
    out.update({k.split(".")[-1]: v for k, v in peft.VeRA.hf_shared(nodes).items()})
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def adapted_chains():
  arrays, cases, ours = {}, [], {}
  for k, (name, (dims, spec, ptype, config)) in enumerate(LAYERS.items()):
    ws, bs, x = chain_params(name, dims)
    params = {f"l{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in enumerate(zip(ws, bs))}
    params = perturbed(peft.apply(params, {r"l\d/kernel": spec}, jax.random.PRNGKey(k)), k)
    ours[name] = (params, x)
    arrays.update({f"{name}__w{i}": w for i, w in enumerate(ws)})
    arrays.update({f"{name}__b{i}": b for i, b in enumerate(bs)})
    arrays.update({f"{name}__t__{t}": v for t, v in peft_tensors(params, len(ws)).items()})
    arrays[f"{name}__x"] = x
    cases.append({"name": name, "peft_type": ptype, "config": config, "dims": list(dims)})
  return arrays, cases, ours


# ---- whole model: our exports loaded by PEFT, PEFT's adapters imported here ---------------------------
EXPORTS = {
    "vera_export": (ALL, peft.AdapterSpec("vera", rank=4)),
    "hra_export": (("q_proj", "v_proj", "down_proj"), peft.AdapterSpec("hra", rank=4)),
    "miss_export": (ALL, peft.AdapterSpec("miss", rank=4)),
    "miss_bat_export": (("q_proj", "up_proj", "down_proj"), peft.AdapterSpec("miss", rank=4, options={"mode": "bat"})),
}
IMPORTS = {
    "vera_import": ("VERA", {"r": 4, "target_modules": list(ALL)}),
    "hra_import": ("HRA", {"r": 4, "apply_GS": True, "init_weights": False, "target_modules": ["q_proj", "v_proj"]}),
    "miss_import": ("MISS", {"r": 4, "init_weights": "mini", "mini_r": 8, "target_modules": ["q_proj", "up_proj"]}),
}


@pytest.fixture(scope="module")
def tiny():
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=VOCAB))
  return model, jax.jit(model.init)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
  refenv.require()
  root = tmp_path_factory.mktemp("family_a")
  model, params = tiny
  models.save_hf(str(root / "base"), model.config, params)
  arrays, layer_cases, chains = adapted_chains()
  exported, loads = {}, []
  for k, (name, (targets, spec)) in enumerate(EXPORTS.items()):
    trained = perturbed(peft.apply(params, {targets: spec}, jax.random.PRNGKey(10 + k)), 10 + k)
    peft.export_adapter(str(root / name), trained, spec, "llama")
    exported[name] = trained
    loads.append({"name": name, "base": str(root / "base"), "adapter": str(root / name)})
  makes = [{"name": n, "base": str(root / "base"), "peft_type": t, "config": c, "seed": k}
           for k, (n, (t, c)) in enumerate(IMPORTS.items())]
  ref = refenv.run("peft_family_a", {**arrays, "tokens": TOKENS}, root=str(root),
                   layers=json.dumps(layer_cases), loads=json.dumps(loads), makes=json.dumps(makes))
  return root, chains, exported, ref


def logits(model, params):
  return np.asarray(jax.jit(model.apply)(params, TOKENS))


@pytest.mark.parity
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_matches_peft_unmerged_and_merged(reference, name):
  _, chains, _, ref = reference
  params, x = chains[name]
  n = len(LAYERS[name][0]) - 1
  y = chain(params, x, n)
  assert rel_err(y, ref[f"{name}__y"]) <= REL_TOL
  assert rel_err(chain(peft.merge(params), x, n), ref[f"{name}__ym"]) <= REL_TOL
  assert rel_err(chain(peft.strip(params), x, n), ref[f"{name}__y"]) > 100 * REL_TOL   # the adapter matters


@pytest.mark.parity
@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_peft_with_our_logits(reference, tiny, name):
  _, _, exported, ref = reference
  model, _ = tiny
  ours = logits(model, exported[name])
  assert rel_err(ours, ref[f"{name}__logits"]) <= REL_TOL
  assert rel_err(ours, ref[f"{name}__merged"]) <= REL_TOL
  assert rel_err(logits(model, peft.strip(exported[name])), ref[f"{name}__logits"]) > 100 * REL_TOL


@pytest.mark.parity
@pytest.mark.parametrize("name", list(IMPORTS))
def test_import_of_peft_adapter_gives_peft_logits(reference, tiny, name):
  root, _, _, ref = reference
  model, params = tiny
  imported = peft.import_adapter(str(root / name), params)
  assert rel_err(logits(model, imported), ref[f"{name}__logits"]) <= REL_TOL
  assert rel_err(logits(model, peft.merge(imported)), ref[f"{name}__merged"]) <= REL_TOL


# ---- trainable-parameter counts (each paper's formula) ---------------------------------------------
def kernel_dims(cfg):
  """(in, out) of every linear kernel of one decoder layer."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  hd = d // cfg.num_heads
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def trainable_count(params, spec):
  return peft.count(peft.split(peft.apply(params, {"all-linear": spec}))[0])


def test_vera_trainable_count_is_r_plus_out_per_layer(tiny):
  model, params = tiny
  r, L = 4, model.config.num_layers
  assert trainable_count(params, peft.AdapterSpec("vera", rank=r)) == L * sum(r + o for _, o in kernel_dims(model.config))


def test_hra_trainable_count_is_r_times_in_per_layer(tiny):
  model, params = tiny
  r, L = 4, model.config.num_layers
  assert trainable_count(params, peft.AdapterSpec("hra", rank=r)) == L * sum(r * i for i, _ in kernel_dims(model.config))


def test_miss_trainable_count_per_mode(tiny):
  model, params = tiny
  r, L, dims = 4, model.config.num_layers, kernel_dims(model.config)
  assert trainable_count(params, peft.AdapterSpec("miss", rank=r)) == L * sum(r * o for _, o in dims)
  # bat: out / r blocks of r x r
  assert trainable_count(params, peft.AdapterSpec("miss", rank=r, options={"mode": "bat"})) == L * sum(
      (o // r) * r * r for _, o in dims)
  assert trainable_count(params, peft.AdapterSpec("miss", rank=r, options={"mode": "mini", "mini_r": 8})) == (
      L * len(dims) * r * 8)


def test_nola_trainable_count_is_k_plus_l_per_layer(tiny):
  model, params = tiny
  spec = peft.AdapterSpec("nola", rank=4, options={"num_basis_a": 5, "num_basis_b": 7})
  assert trainable_count(params, spec) == model.config.num_layers * len(kernel_dims(model.config)) * (5 + 7)


# ---- identity at init ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    peft.AdapterSpec("vera", rank=4), peft.AdapterSpec("hra", rank=4), peft.AdapterSpec("miss", rank=4),
    peft.AdapterSpec("miss", rank=4, options={"mode": "bat"}),
    peft.AdapterSpec("miss", rank=4, options={"mode": "mini", "mini_r": 8})],
    ids=["vera", "hra", "miss", "miss_bat", "miss_mini"])     # NOLA's: in its float64 test below
def test_identity_at_init(tiny, spec):
  model, params = tiny
  base = logits(model, params)
  adapted = peft.apply(params, {"all-linear": spec})
  # Up to float32 rounding (HRA's paired reflections cancel; XLA fuses the others' added zero differently).
  assert rel_err(logits(model, adapted), base) <= 1e-6
  # ...and not trivially: moving the trainable parts changes the output.
  assert rel_err(logits(model, perturbed(adapted, 0)), base) > 1e-3


# ---- VeRA's shared basis ---------------------------------------------------------------------------
def test_vera_basis_is_regenerated_from_the_seed_and_never_trained(tiny):
  model, params = tiny
  f = model.config.intermediate_size
  spec = peft.AdapterSpec("vera", rank=4, options={"projection_prng_key": 7})
  one = peft.apply(params, {ALL: spec}, jax.random.PRNGKey(1))
  two = peft.apply(params, {ALL: spec}, jax.random.PRNGKey(2))     # the apply key plays no part
  # Sized for the largest targeted layer (in = out = intermediate size), then sliced per layer.
  a, b = jax.jit(peft.vera_basis, static_argnums=(0, 1, 2, 3))(7, 4, f, f)
  a_eager, b_eager = peft.vera_basis(7, 4, f, f)
  np.testing.assert_array_equal(a, a_eager)
  np.testing.assert_array_equal(b, b_eager)
  for mod in ("attn/q_proj", "mlp/down_proj", "mlp/up_proj"):
    for tree in (one, two):
      node = tree["layers"][mod.split("/")[0]][mod.split("/")[1]]["kernel"]
      n_in, n_out = node.base.shape[-2:]
      np.testing.assert_array_equal(node.a, a[:n_in])
      np.testing.assert_array_equal(node.b, b[:, :n_out])
  other = peft.apply(params, {ALL: spec.replace(options={"projection_prng_key": 8})})
  assert not np.array_equal(other["layers"]["attn"]["q_proj"]["kernel"].a, one["layers"]["attn"]["q_proj"]["kernel"].a)
  # The trainable tree (what an adapter checkpoint saves) holds d and b only.
  trainable, frozen = peft.split(one)
  names = sorted({p.split("/")[-1] for p in peft.flatten(trainable)})
  assert names == ["lambda_b", "lambda_d"]
  assert {"a", "b"} <= {p.split("/")[-1] for p in peft.flatten(frozen)}
  # A gradient step never sees the basis: it is not an argument of the differentiated function.
  ws, bs, x = chain_params("vera", (16, 24, 8))
  small = peft.apply({f"l{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in
                      enumerate(zip(ws, bs))}, {r"l\d/kernel": spec})
  t, f = peft.split(small)
  grads = jax.grad(lambda t: chain(peft.combine(t, f), x, 2).sum())(t)
  assert sorted({p.split("/")[-1] for p in peft.flatten(grads)}) == ["lambda_b", "lambda_d"]


# ---- NOLA against its formula in float64 -----------------------------------------------------------
def test_nola_matches_float64_formula_and_regenerates_its_bases():
  rng = np.random.RandomState(0)
  w = rng.normal(0, 0.3, (3, 12, 10)).astype(np.float32)           # three stacked layers
  x = rng.normal(size=(4, 12)).astype(np.float32)
  spec = peft.AdapterSpec("nola", rank=4, alpha=8, options={"num_basis_a": 5, "num_basis_b": 6, "basis_seed": 3})
  init = peft.apply({"w": {"kernel": jnp.asarray(w)}}, {"w/kernel": spec})["w"]["kernel"]
  node = perturbed({"n": init}, 1)["n"]
  again = peft.apply({"w": {"kernel": jnp.asarray(w)}}, {"w/kernel": spec}, jax.random.PRNGKey(5))["w"]["kernel"]
  np.testing.assert_array_equal(node.key, again.key)                 # bases depend on seed and path only

  @jax.jit
  def ours(node, init):
    per_layer = jax.vmap(lambda n: (n.dot(jnp.asarray(x)), *peft.nola_bases(n.key, 5, 6, 4, 12, 10)))
    y, ab, bb = per_layer(node)
    return y, ab, bb, node.materialize(), jax.vmap(lambda n: n.dot(jnp.asarray(x)))(init)
  y, ab, bb, merged, y_init = ours(node, init)
  a = np.einsum("nk,nkir->nir", np.float64(node.coef_a), np.float64(ab))
  b = np.einsum("nl,nlro->nro", np.float64(node.coef_b), np.float64(bb))
  want = np.float64(w) + 8 / 4 * a @ b
  assert rel_err(y, np.einsum("bi,nio->nbo", np.float64(x), want)) <= REL_TOL
  assert rel_err(merged, want) <= REL_TOL
  assert rel_err(np.einsum("bi,nio->nbo", x, w), np.einsum("bi,nio->nbo", np.float64(x), want)) > 100 * REL_TOL
  # beta = 0 at init: the identity.
  assert rel_err(y_init, np.einsum("bi,nio->nbo", np.float64(x), np.float64(w))) <= 1e-6
  assert sorted({p.split("/")[-1] for p in peft.flatten(peft.split({"n": node})[0])}) == ["coef_a", "coef_b"]
