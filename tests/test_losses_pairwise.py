"""Pairwise and unpaired losses beyond the TRL parity cases: BCO (not in TRL v1.x), KTO's KL inputs,
SimPO's paper defaults, ORPO at certainty, and one contract over every preference loss."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses

B = 6
LABEL = np.array([True, False, True, False, False, True])


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _unpaired(seed):
  rng = np.random.default_rng(seed)
  pol = {"logps": rng.normal(size=(B, 1)) * 3 - 10}
  ref = {"logps": pol["logps"] + rng.normal(size=(B, 1)) * 2}
  return pol, ref


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


# ------------------------------------------------------------------------------------------------
# BCO.
# ------------------------------------------------------------------------------------------------
def _bco_numpy(pol, ref, beta, shift, udm=1.0):
  r = beta * (pol["logps"][:, 0] - ref["logps"][:, 0])
  per = np.where(LABEL, -_log_sigmoid(r - shift), -udm * _log_sigmoid(-(r - shift)))
  return per.mean()


def test_bco_first_step_shifts_by_the_batch_mean():
  pol, ref = _unpaired(0)
  with jax.enable_x64(True):
    loss, m = losses.bco_loss(pol, ref, {"label": LABEL}, _cfg(beta=0.2))
  mean_r = (0.2 * (pol["logps"] - ref["logps"])).mean()
  assert float(m["bco/reward_shift"]) == pytest.approx(mean_r, rel=1e-12)
  assert float(m["bco/steps"]) == 1.0
  assert float(loss) == pytest.approx(_bco_numpy(pol, ref, 0.2, mean_r), rel=1e-12)


def test_bco_running_mean_over_steps_is_trl_running_moments():
  """Feeding the returned state back gives the plain mean of the per-step batch means."""
  state = {"bco_reward_shift": 0.0, "bco_steps": 0.0}
  means = []
  with jax.enable_x64(True):
    for step in range(3):
      pol, ref = _unpaired(10 + step)
      udm = np.linspace(0.5, 1.5, B)
      loss, m = losses.bco_loss(pol, ref, {"label": LABEL, "bco_udm_weight": udm, **state},
                                _cfg(beta=0.1))
      means.append((0.1 * (pol["logps"] - ref["logps"])).mean())
      assert float(m["bco/reward_shift"]) == pytest.approx(np.mean(means), rel=1e-12)
      assert float(loss) == pytest.approx(_bco_numpy(pol, ref, 0.1, np.mean(means), udm), rel=1e-12)
      state = {"bco_reward_shift": m["bco/reward_shift"], "bco_steps": m["bco/steps"]}
  assert float(state["bco_steps"]) == 3.0


def test_bco_shift_is_not_differentiated():
  pol, ref = _unpaired(1)
  g = jax.grad(lambda lp: losses.bco_loss({"logps": lp}, ref, {"label": LABEL}, _cfg(beta=0.1))[0])(
      jnp.asarray(pol["logps"], jnp.float32))
  r = 0.1 * (pol["logps"][:, 0] - ref["logps"][:, 0])
  shift = r.mean()
  # d/dlp of -log sig(+-(r - shift)) with the shift held constant.
  want = np.where(LABEL, -(1 - 1 / (1 + np.exp(-(r - shift)))), 1 / (1 + np.exp(-(r - shift)))) * 0.1 / B
  np.testing.assert_allclose(g[:, 0], want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# KTO.
# ------------------------------------------------------------------------------------------------
def test_kto_reads_the_kl_completions_from_either_layout():
  pol, ref = _unpaired(2)
  rng = np.random.default_rng(2)
  kl_pol, kl_ref = rng.normal(size=B) - 5, rng.normal(size=B) - 6
  with jax.enable_x64(True):
    a, ma = losses.kto_loss({**pol, "kl_logps": kl_pol}, {**ref, "kl_logps": kl_ref}, {"label": LABEL},
                            _cfg())
    b, mb = losses.kto_loss({"logps": np.concatenate([pol["logps"], kl_pol[:, None]], 1)},
                            {"logps": np.concatenate([ref["logps"], kl_ref[:, None]], 1)},
                            {"label": LABEL}, _cfg())
  assert float(a) == float(b) and float(ma["kl"]) == float(mb["kl"]) > 0
  with pytest.raises(ValueError, match="kl_logps"):
    losses.kto_loss(pol, ref, {"label": LABEL}, _cfg())


def test_kto_clamps_a_negative_kl_estimate_to_zero():
  pol, ref = _unpaired(3)
  kl_pol, kl_ref = np.full(B, -9.0), np.full(B, -7.0)  # mean KL estimate -2
  with jax.enable_x64(True):
    loss, m = losses.kto_loss({**pol, "kl_logps": kl_pol}, {**ref, "kl_logps": kl_ref},
                              {"label": LABEL}, _cfg(beta=0.3))
  rho = pol["logps"][:, 0] - ref["logps"][:, 0]
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = np.where(LABEL, 1 - sig(0.3 * rho), 1 - sig(-0.3 * rho)).mean()
  assert float(m["kl"]) == 0.0
  assert float(loss) == pytest.approx(want, rel=1e-12)


def test_kto_kl_term_gets_no_gradient():
  pol, ref = _unpaired(4)
  lp = jnp.asarray(np.concatenate([pol["logps"], pol["logps"] + 3.0], 1), jnp.float32)
  rf = {"logps": jnp.asarray(np.concatenate([ref["logps"], ref["logps"]], 1), jnp.float32)}
  g = jax.grad(lambda x: losses.kto_loss({"logps": x}, rf, {"label": LABEL}, _cfg())[0])(lp)
  assert float(jnp.abs(g[:, 1]).sum()) == 0.0 and float(jnp.abs(g[:, 0]).sum()) > 0


# ------------------------------------------------------------------------------------------------
# SimPO and ORPO.
# ------------------------------------------------------------------------------------------------
def _paired(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 9, size=(B, 2)).astype(np.float64)
  tlp = -rng.uniform(0.1, 2.0, size=(B, 2, 8))
  mask = (np.arange(8)[None, None] < lengths[..., None]).astype(np.float64)
  return {"token_logps": tlp, "mask": mask, "logps": (tlp * mask).sum(-1), "lengths": lengths}


def test_simpo_defaults_are_the_papers():
  pol = _paired(5)
  with jax.enable_x64(True):
    loss, _ = losses.simpo_loss(pol, None, {}, _cfg())
  avg = pol["logps"] / pol["lengths"]
  want = -_log_sigmoid(2.0 * (avg[:, 0] - avg[:, 1]) - 1.0).mean()
  assert float(loss) == pytest.approx(want, rel=1e-12)


def test_orpo_is_finite_at_certainty():
  pol = _paired(6)
  pol = {**pol, "logps": pol["logps"] * np.array([0.0, 1.0])}  # the chosen completion has p = 1
  g = jax.grad(lambda lp: losses.orpo_loss({**pol, "logps": lp}, None, {}, _cfg())[0])(
      jnp.asarray(pol["logps"], jnp.float32))
  assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------------------------------------
# One contract over every preference loss.
# ------------------------------------------------------------------------------------------------
K, T, V, D = 3, 5, 7, 4
PREFERENCE = ("dpo", "cpo", "simpo", "orpo", "aligned_sft", "kto", "bco", "lipo", "listnet", "listmle", "pro",
              "dpo_kernels")


def _contract_inputs(name, seed=7):
  rng = np.random.default_rng(seed)
  # Pairwise losses see K = 2, listwise ones a list of 3, unpaired ones a completion plus a KL one.
  k = {"pairwise": 2, "listwise": K, "unpaired": 2}[losses.get(name).kind]
  mask = np.ones((B, k, T), np.float32)
  mask[:, :, -1] = 0.0

  def outputs():
    tlp = -rng.uniform(0.1, 2.0, size=(B, k, T)).astype(np.float32)
    return {"token_logps": tlp, "mask": mask, "logps": (tlp * mask).sum(-1), "lengths": mask.sum(-1),
            "embeddings": rng.normal(size=(B, k, D)).astype(np.float32),
            "prompt_embeddings": rng.normal(size=(B, k, D)).astype(np.float32),
            "last_logits": rng.normal(size=(B, k, V)).astype(np.float32)}

  batch = {"label": LABEL, "scores": np.tile(np.arange(k, 0, -1, dtype=np.float32), (B, 1)),
           "list_mask": np.ones((B, k), bool)}
  return outputs(), outputs(), batch


@pytest.mark.parametrize("name", PREFERENCE)
def test_contract(name):
  """Registered with a kind; jits; a finite scalar loss; a gradient into the policy log-probs; and TRL's
  `rewards/chosen` metric."""
  entry = losses.get(name)
  pol, ref, batch = _contract_inputs(name)
  ref = ref if "reference" in entry.needs else None
  cfg = _cfg()

  @jax.jit
  def f(p):
    return entry.fn(p, ref, batch, cfg)

  loss, metrics = f(pol)
  assert loss.shape == () and np.isfinite(float(loss))
  assert "rewards/chosen" in metrics
  assert all(np.isfinite(float(v)) for v in metrics.values())
  g = jax.grad(lambda p: f(p)[0])(pol)
  assert float(jnp.abs(g["logps"]).sum() + jnp.abs(g["token_logps"]).sum()) > 0
  assert math.isfinite(float(jnp.abs(g["logps"]).sum()))
