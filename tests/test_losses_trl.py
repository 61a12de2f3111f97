"""Parity of the preference losses with TRL v1.16's own loss code (tests/ref/trl_losses.py).

One reference subprocess computes every case: TRL's DPO loss for all 15 loss types, the f-divergence score
maps, loss mixtures (RPO = sigmoid + sft), LD-DPO and WPO; KTO (and APO-zero-unpaired); CPO (sigmoid,
hinge, ipo, simpo, alphapo, AlphaPO rewards) and ORPO from logits through TRL's forward code; cDPO label
smoothing through TRL's CPO loss. BCO is not in TRL v1.x; tests/test_losses_pairwise.py checks it.
TRL v1.16 crashes on `sft` combined with `use_weighting` (an in-place product on an expanded tensor), so
that combination has no parity case; ours weights the sft term like every other term.
Float64 cases must agree to rel 1e-6, float32 ones to 1e-5.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
from tests import refenv

B, T, V = 6, 8, 16
T1 = T - 1
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logsumexp(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _gather(logp, ids):
  return np.take_along_axis(logp, ids[..., None], -1)[..., 0]


def _completion_mask(rng, shape):
  """Random contiguous completion spans (after a prompt of 0-2 positions) with right padding."""
  mask = np.zeros(shape)
  for idx in np.ndindex(shape[:-1]):
    start = rng.integers(0, 3)
    length = rng.integers(1, shape[-1] - start + 1)
    mask[idx + (slice(start, start + length),)] = 1.0
  return mask


def make_arrays(seed=0):
  rng = np.random.default_rng(seed)
  a = {}
  # DPO: per-token log-probs of policy and reference from random logits; garbage outside the mask.
  logits = 1.5 * rng.normal(size=(B, 2, T1, V))
  ref_logits = logits + 0.7 * rng.normal(size=logits.shape)
  ids = rng.integers(0, V, size=(B, 2, T1))
  a["dpo_tlp_pol"] = _gather(_log_softmax(logits), ids)
  a["dpo_tlp_ref"] = _gather(_log_softmax(ref_logits), ids)
  a["dpo_lssp"] = _logsumexp(2.0 * _log_softmax(logits))
  a["dpo_mask"] = _completion_mask(rng, (B, 2, T1))
  # KTO: one completion per example plus the mismatched (KL) completion.
  a["kto_tlp"] = -rng.uniform(0.1, 3.0, size=(B, T1))
  a["kto_mask"] = _completion_mask(rng, (B, T1))
  a["kto_kl_tlp"] = -rng.uniform(0.1, 3.0, size=(B, T1))
  a["kto_kl_mask"] = _completion_mask(rng, (B, T1))
  a["kto_ref_logps"] = (a["kto_tlp"] * a["kto_mask"]).sum(-1) + rng.normal(size=B)
  # A positive mean KL, so that z0 is not clamped to 0.
  a["kto_ref_kl_logps"] = (a["kto_kl_tlp"] * a["kto_kl_mask"]).sum(-1) - rng.uniform(0.2, 2.0, size=B)
  a["kto_label"] = np.array([True, False, True, True, False, False])
  # CPO / ORPO: logits over a one-token prompt plus a right-padded completion.
  a["po_logits"] = 1.5 * rng.normal(size=(B, 2, T, V))
  a["po_ids"] = rng.integers(1, V, size=(B, 2, T))
  lengths = rng.integers(1, T, size=(B, 2))
  a["po_attn"] = (np.arange(T)[None, None, :] <= lengths[..., None]).astype(np.int64)
  # cDPO: log-ratios.
  a["cdpo_rho_c"] = 3.0 * rng.normal(size=B)
  a["cdpo_rho_r"] = 3.0 * rng.normal(size=B)
  return a


def _outputs(tlp, mask, **extra):
  return {"token_logps": tlp, "mask": mask, "logps": (tlp * mask).sum(-1), "lengths": mask.sum(-1),
          **extra}


def our_inputs(a, trainer):
  """(loss name, policy, reference, batch) in the project's layout for one TRL trainer."""
  if trainer == "dpo":
    pol = _outputs(a["dpo_tlp_pol"], a["dpo_mask"], log_sum_sq_probs=a["dpo_lssp"])
    return "dpo", pol, _outputs(a["dpo_tlp_ref"], a["dpo_mask"]), {}
  if trainer == "kto":
    pol = _outputs(a["kto_tlp"][:, None], a["kto_mask"][:, None],
                   kl_logps=(a["kto_kl_tlp"] * a["kto_kl_mask"]).sum(-1))
    ref = {"logps": a["kto_ref_logps"][:, None], "kl_logps": a["kto_ref_kl_logps"]}
    return "kto", pol, ref, {"label": a["kto_label"]}
  if trainer in ("cpo", "orpo"):
    logp = _log_softmax(a["po_logits"][:, :, :-1])
    tlp = _gather(logp, a["po_ids"][:, :, 1:])
    return trainer, _outputs(tlp, a["po_attn"][:, :, 1:].astype(np.float64)), None, {}
  raise ValueError(trainer)


def _dpo(loss_type, weights=None, **kw):
  return {"trainer": "dpo", "loss_type": list(loss_type), "loss_weights": weights, "beta": 0.1, **kw}


CASES = (
    [_dpo([t]) for t in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                         "apo_down", "discopop", "sft", "sigmoid_norm")]
    + [_dpo([t], label_smoothing=0.1) for t in ("exo_pair", "robust", "aot", "aot_unpaired")]
    + [_dpo(["sigmoid"], beta=0.5), _dpo(["discopop"], discopop_tau=0.3, beta=0.3),
       _dpo(["robust"], label_smoothing=0.3), _dpo(["exo_pair"], label_smoothing=1e-3)]
    + [_dpo([t], f_divergence_type=f, label_smoothing=0.1 if t in ("exo_pair", "robust") else 0.0)
       for f in ("forward_kl", "js_divergence")
       for t in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "sft")]
    + [_dpo([t], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=c, dtype="float32")
       for t in ("sigmoid", "ipo", "sigmoid_norm") for c in (0.5, 0.2)]
    + [_dpo(["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0,
            dtype="float32")]
    + [_dpo(["sigmoid", "sft"], [1.0, 0.7]),                       # RPO
       _dpo(["sigmoid", "ipo", "hinge"], [0.5, 0.3, 0.2]),
       _dpo(["sigmoid"], ld_alpha=0.4), _dpo(["ipo", "sft"], [1.0, 0.5], ld_alpha=0.0),
       _dpo(["aot", "nca_pair"], [1.0, 2.0], ld_alpha=0.7, label_smoothing=0.2),
       _dpo(["sigmoid"], use_weighting=True), _dpo(["sigmoid", "hinge"], [1.0, 0.3], use_weighting=True),
       _dpo(["sigmoid"], use_weighting=True, ld_alpha=0.5, f_divergence_type="js_divergence")]
    + [{"trainer": "kto", "beta": 0.1}, {"trainer": "kto", "beta": 0.3, "undesirable_weight": 1.33},
       {"trainer": "kto", "beta": 0.2, "loss_type": "apo_zero_unpaired", "desirable_weight": 0.8}]
    + [{"trainer": "cpo", "loss_type": "sigmoid", "beta": 0.1},
       {"trainer": "cpo", "loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1, "cpo_alpha": 0.5},
       {"trainer": "cpo", "loss_type": "hinge", "beta": 0.1},
       {"trainer": "cpo", "loss_type": "ipo", "beta": 0.3},
       {"trainer": "cpo", "loss_type": "simpo", "beta": 0.1, "simpo_gamma": 0.5},
       {"trainer": "cpo", "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0},
       # Our "simpo" entry (paper defaults, no NLL) against TRL's CPO-simpo with cpo_alpha = 0.
       {"trainer": "cpo", "ours": "simpo", "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0,
        "cpo_alpha": 0.0},
       {"trainer": "cpo", "ours": "simpo", "loss_type": "simpo", "beta": 2.5, "simpo_gamma": 0.3,
        "cpo_alpha": 0.0, "label_smoothing": 0.05},
       {"trainer": "cpo", "loss_type": "alphapo", "beta": 2.0, "simpo_gamma": 1.0, "alpha": 0.3},
       {"trainer": "cpo", "loss_type": "sigmoid", "beta": 0.1, "alpha": 0.05}]
    + [{"trainer": "orpo", "beta": 0.1, "dtype": "float32"},
       {"trainer": "orpo", "beta": 0.5, "dtype": "float32"}]
    + [{"trainer": "cdpo", "beta": 0.1, "label_smoothing": e} for e in (0.1, 0.3)]
)


def _case_id(c):
  parts = [c.get("ours", c["trainer"])] + [
      str(v if not isinstance(v, list) else "+".join(map(str, v)))
      for k, v in c.items() if k not in ("trainer", "dtype", "ours") and v is not None]
  return "-".join(parts)


def _cfg(c):
  skip = ("trainer", "dtype", "ours")
  return ml_collections.ConfigDict({k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in c.items() if k not in skip and v is not None})


@pytest.fixture(scope="module")
def arrays():
  return make_arrays()


@pytest.fixture(scope="module")
def trl(arrays):
  refenv.require()
  return refenv.run("trl_losses", arrays, cases=json.dumps(CASES))


def _ours(arrays, c):
  """Our loss and metrics for case c, in c's dtype (float64 under x64)."""
  dtype = np.float32 if c.get("dtype") == "float32" else np.float64
  if c["trainer"] == "cdpo":
    rho_c, rho_r = arrays["cdpo_rho_c"], arrays["cdpo_rho_r"]
    zeros = np.zeros((B, 2, 1))
    pol = {"logps": np.stack([rho_c, rho_r], 1), "lengths": np.ones((B, 2)), "token_logps": zeros,
           "mask": zeros}
    ref = {"logps": np.zeros((B, 2)), "lengths": np.ones((B, 2)), "token_logps": zeros, "mask": zeros}
    name, batch, cfg = "dpo", {}, _cfg({"beta": c["beta"], "label_smoothing": c["label_smoothing"]})
  else:
    name, pol, ref, batch = our_inputs(arrays, c["trainer"])
    name, cfg = c.get("ours", name), _cfg(c)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype) if x.dtype.kind == "f" else x, tree)
  pol, ref = cast(pol), (None if ref is None else cast(ref))
  loss, metrics = losses.get(name).fn(pol, ref, batch, cfg)
  return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_matches_trl(i, arrays, trl):
  c = CASES[i]
  rtol, atol = (1e-5, 1e-6) if c.get("dtype") == "float32" else (1e-6, 1e-10)
  with jax.enable_x64(True):
    loss, metrics = _ours(arrays, c)
  np.testing.assert_allclose(loss, trl[f"loss_{i}"], rtol=rtol, atol=atol)
  names = {"dpo": PAIR_METRICS, "cpo": PAIR_METRICS + ("nll_loss",),
           "orpo": PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
           "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                   "logps/rejected", "kl"),
           "cdpo": ()}[c["trainer"]]
  for m in names:
    key = f"m_{i}_{m.replace('/', '.')}"
    np.testing.assert_allclose(metrics[m], trl[key], rtol=rtol, atol=atol, err_msg=m)


def test_every_trl_loss_type_is_covered():
  covered = {t for c in CASES if c["trainer"] == "dpo" for t in c["loss_type"]}
  assert covered == set(losses.DPO_LOSS_TYPES)


# ------------------------------------------------------------------------------------------------
# Behaviour around the parity cases (no reference environment needed).
# ------------------------------------------------------------------------------------------------
def _dpo_loss(arrays, **cfg):
  _, pol, ref, _ = our_inputs(arrays, "dpo")
  with jax.enable_x64(True):
    loss, metrics = losses.dpo_loss(pol, ref, {}, _cfg(cfg))
  return float(loss), metrics


def test_label_smoothing_and_robust_differ_from_sigmoid(arrays):
  plain, _ = _dpo_loss(arrays, loss_type=["sigmoid"])
  smooth, _ = _dpo_loss(arrays, loss_type=["sigmoid"], label_smoothing=0.2)
  robust, _ = _dpo_loss(arrays, loss_type=["robust"], label_smoothing=0.2)
  robust0, _ = _dpo_loss(arrays, loss_type=["robust"], label_smoothing=0.0)
  assert robust0 == pytest.approx(plain, rel=1e-12)
  assert abs(smooth - plain) > 1e-3 and abs(robust - plain) > 1e-3 and abs(robust - smooth) > 1e-3


def test_loss_weights_mix_linearly(arrays):
  parts = {t: _dpo_loss(arrays, loss_type=[t])[0] for t in ("sigmoid", "ipo", "sft")}
  mixed, metrics = _dpo_loss(arrays, loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.5, 2.0, 0.25])
  assert mixed == pytest.approx(0.5 * parts["sigmoid"] + 2.0 * parts["ipo"] + 0.25 * parts["sft"],
                                rel=1e-12)
  assert float(metrics["loss/ipo"]) == pytest.approx(parts["ipo"], rel=1e-12)


def test_sft_is_the_mean_nll_over_chosen_tokens(arrays):
  sft, _ = _dpo_loss(arrays, loss_type=["sft"])
  m = arrays["dpo_mask"][:, 0]
  assert sft == pytest.approx(-(arrays["dpo_tlp_pol"][:, 0] * m).sum() / m.sum(), rel=1e-12)


@pytest.mark.parametrize("cfg, match", [
    (dict(loss_type=["sigmoid", "nope"]), "unknown loss_type"),
    (dict(loss_type=["sigmoid"], loss_weights=[1.0, 2.0]), "loss_weights"),
    (dict(loss_type=["exo_pair"]), "label_smoothing"),
    (dict(loss_type=["nca_pair"], f_divergence_type="forward_kl"), "only works"),
    (dict(loss_type=["sigmoid"], f_divergence_type="chi2"), "f_divergence_type"),
    (dict(loss_type=["aot"], use_weighting=True), "use_weighting"),
])
def test_bad_config_raises(arrays, cfg, match):
  with pytest.raises(ValueError, match=match):
    _dpo_loss(arrays, **cfg)


def test_unknown_loss_type_lists_valid_ones(arrays):
  with pytest.raises(ValueError) as e:
    _dpo_loss(arrays, loss_type=["sigmoid_typo"])
  for t in losses.DPO_LOSS_TYPES:
    assert t in str(e.value)


def test_wpo_needs_the_sum_of_squared_probs(arrays):
  _, pol, ref, _ = our_inputs(arrays, "dpo")
  pol, ref = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), o) for o in (pol, ref))
  del pol["log_sum_sq_probs"]
  with pytest.raises(ValueError, match="log_sum_sq_probs"):
    losses.dpo_loss(pol, ref, {}, _cfg(dict(loss_type=["sigmoid"], use_weighting=True)))


def test_dpo_jits_and_has_gradients(arrays):
  _, pol, ref, _ = our_inputs(arrays, "dpo")
  pol = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pol)
  ref = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ref)
  cfg = _cfg(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5))
  f = jax.jit(lambda lp, tlp: losses.dpo_loss({**pol, "logps": lp, "token_logps": tlp}, ref, {}, cfg)[0])
  g_lp, g_tlp = jax.grad(f, argnums=(0, 1))(pol["logps"], pol["token_logps"])
  # With ld_alpha the summed logps are rebuilt from the tokens; masked tokens get no gradient.
  assert float(jnp.abs(g_lp).sum()) == 0.0
  assert float(jnp.abs(g_tlp * (1 - pol["mask"])).sum()) == 0.0
  assert float(jnp.abs(g_tlp).sum()) > 0.0
