"""Our adapters written in HF PEFT's format and run by HF `peft` on the transformers model; merged
exports run by plain transformers.

Each case adapts a tiny transformers Llama (loaded with `models.load_hf`), moves the adapter away from its
init, exports it with `peft.export_adapter` (or `models.save_hf` for merged exports), and compares our
logits with those of `PeftModel.from_pretrained(base, dir)` (unmerged and after `merge_and_unload`).
tests/ref/peft_load.py also checks that PEFT loaded every tensor of the file with its value.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from models import Decoder, load_hf, save_hf
from tests import refenv

VOCAB = 97
TOKENS = np.random.RandomState(1).randint(0, VOCAB, (2, 12)).astype(np.int32)
REL_TOL = 1e-5
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def perturbed(params, seed):
  """Every adapter tensor moved off its init (B != 0, magnitudes and IA3 scales != their start)."""
  rng = np.random.RandomState(seed)
  def move(node):
    if not peft.is_adapter(node) or isinstance(node, peft.QuantizedWeight):
      return node
    upd = {}
    for f in node.trainable_fields:
      if getattr(node, f) is None:      # an optional part this node does not have (LoRA without bias)
        continue
      x = np.asarray(getattr(node, f))
      noise = rng.normal(size=x.shape).astype(np.float32)
      upd[f] = jnp.asarray(x * (1 + 0.2 * noise) if f in ("m", "l") else x + 0.1 * noise)
    return node.replace(**upd)
  return jax.tree.map(move, params, is_leaf=peft.is_adapter)


def spec(method="lora", **kw):
  return peft.AdapterSpec(method, **{"rank": 4, "alpha": 8, **kw})


# name -> (base model, targets, AdapterSpec, export kwargs)
CASES = {
    "lora": ("llama", ALL + ("lm_head",), spec(), {}),
    "rslora": ("llama", ("q_proj", "v_proj", "up_proj"), spec(alpha=6, use_rslora=True), {}),
    "dora": ("llama", ALL, spec("dora"), {}),
    "lora_bias": ("llama", ALL, spec(options={"lora_bias": True}), {}),   # PEFT merges it into the base biases
    "pissa_to_lora": ("llama", ALL, spec(init="pissa"), {"initial": True}),
    "olora_to_lora": ("llama", ("q_proj", "down_proj"), spec(init="olora", alpha=4), {"initial": True}),
    "adalora": ("llama", ("q_proj", "v_proj", "down_proj"), spec("adalora", options={"init_r": 4, "total_step": 10}),
                {}),
    "ia3": ("llama_linear", ("k_proj", "v_proj", "down_proj"), spec("ia3", options={"feedforward": "down_proj"}),
            {}),
    "kasa": ("llama", ("q_proj", "v_proj", "down_proj"), spec("kasa"), {}),   # PEFT truncates the base on load
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  refenv.require()
  root = tmp_path_factory.mktemp("peft_export")
  refenv.run("hf_make_model", {"tokens": TOKENS}, root=str(root), names="llama,llama_linear")
  bases = {b: load_hf(str(root / b), dtype="float32") for b in ("llama", "llama_linear")}
  jobs, ours = [], {}
  for k, (name, (base, targets, s, kw)) in enumerate(CASES.items()):
    cfg, params = bases[base]
    initial = peft.apply(params, {targets: s}, jax.random.PRNGKey(k))
    trained = perturbed(initial, k)
    peft.export_adapter(str(root / name), trained, s, "llama",
                        initial=initial if kw.get("initial") else None)
    ours[name] = (Decoder(cfg), trained)
    jobs.append({"base": str(root / base), "adapter": str(root / name)})

  # A PiSSA adapter shipped as it is belongs on the residual base, written merged-free by save_hf.
  cfg, params = bases["llama"]
  trained = perturbed(peft.apply(params, {ALL: spec(init="pissa")}, jax.random.PRNGKey(7)), 7)
  save_hf(str(root / "residual_base"), cfg, peft.strip(trained))
  peft.export_adapter(str(root / "pissa_residual"), trained, spec(init="pissa"), residual_ok=True)
  ours["pissa_residual"] = (Decoder(cfg), trained)
  jobs.append({"base": str(root / "residual_base"), "adapter": str(root / "pissa_residual")})

  # Merged export of mixed adapters on an NF4 base: a plain transformers checkpoint.
  mixed = peft.quantize_params(params, lambda p: p.endswith("/kernel") and "lm_head" not in p, "nf4")
  mixed = perturbed(peft.apply(mixed, {("q_proj", "v_proj"): spec(), "layers/mlp/.*/kernel": spec("dora")},
                               jax.random.PRNGKey(9)), 9)
  save_hf(str(root / "merged"), cfg, mixed)
  ours["merged"] = (Decoder(cfg), mixed)
  jobs.append({"base": str(root / "merged"), "adapter": None})

  ref = refenv.run("peft_load", {"tokens": TOKENS}, jobs=json.dumps(jobs))
  return root, ours, {name: (ref[f"logits_{k}"], ref.get(f"merged_{k}")) for k, name in enumerate(ours)}


def our_logits(model, params):
  return np.asarray(jax.jit(model.apply)(params, TOKENS))


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES) + ["pissa_residual"])
def test_exported_adapter_runs_in_peft_with_our_logits(exported, name):
  _, ours, ref = exported
  model, params = ours[name]
  got = our_logits(model, params)
  assert rel_err(got, ref[name][0]) <= REL_TOL
  assert rel_err(got, ref[name][1]) <= REL_TOL            # PEFT's merge_and_unload of our adapter
  # Not the base model's logits (the adapter matters at this tolerance).
  assert rel_err(our_logits(model, peft.strip(params)), ref[name][0]) > 100 * REL_TOL


@pytest.mark.parity
def test_pissa_converted_to_lora_doubles_rank_on_the_original_base(exported):
  root, _, _ = exported
  config = json.load(open(root / "pissa_to_lora" / "adapter_config.json"))
  assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
  assert sorted(config["target_modules"]) == sorted(ALL)


@pytest.mark.parity
def test_merged_export_loads_as_plain_transformers_model(exported):
  """models.save_hf merges LoRA and DoRA nodes over an NF4 base into plain weights."""
  _, ours, ref = exported
  model, params = ours["merged"]
  assert rel_err(our_logits(model, peft.merge(params)), ref["merged"][0]) <= REL_TOL
  assert rel_err(our_logits(model, params), ref["merged"][0]) <= REL_TOL
