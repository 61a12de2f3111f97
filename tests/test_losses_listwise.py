"""Listwise losses: LiPO-lambda, ListNet, ListMLE and PRO against direct evaluations of their formulas."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses

BETA = 0.5
# Three lists of K = 4: ties in the first and third, a masked (padded) fourth entry in the second.
PSI = np.array([[2.0, 0.0, 1.0, 1.0], [1.0, 3.0, 0.0, 2.0], [0.0, 0.0, 1.0, 2.0]])
VALID = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)


def _lists(seed=0):
  rng = np.random.default_rng(seed)
  pol = rng.normal(size=PSI.shape) * 4.0 - 10.0
  ref = pol + rng.normal(size=PSI.shape) * 3.0
  pol[1, 3] = 1e3  # garbage in the padded slot: it must not matter
  lengths = rng.integers(1, 9, size=PSI.shape).astype(np.float64)
  return pol, ref, lengths


def _call(name, pol, ref, psi=PSI, valid=VALID, lengths=None, **cfg):
  lengths = jnp.ones(np.shape(pol)) if lengths is None else lengths
  policy = {"logps": jnp.asarray(pol), "lengths": jnp.asarray(lengths)}
  reference = None if ref is None else {"logps": jnp.asarray(ref)}
  batch = {"scores": psi, "list_mask": valid}
  loss, metrics = losses.get(name).fn(policy, reference, batch, ml_collections.ConfigDict(cfg))
  return loss, metrics


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def lipo_by_loops(s, psi, valid):
  """LiPO-lambda written out entry by entry from the paper's formula."""
  total = 0.0
  for b in range(s.shape[0]):
    idx = [i for i in range(s.shape[1]) if valid[b, i]]
    rank = {}
    for i in idx:  # 1-based rank by current scores, descending; ties broken by position
      rank[i] = 1 + sum(1 for j in idx if s[b, j] > s[b, i] or (s[b, j] == s[b, i] and j < i))
    loss = 0.0
    for i in idx:
      for j in idx:
        if psi[b, i] > psi[b, j]:
          gain = abs((2 ** psi[b, i] - 1) - (2 ** psi[b, j] - 1))
          disc = abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
          loss -= gain * disc * _log_sigmoid(s[b, i] - s[b, j])
    total += loss
  return total / s.shape[0]


def test_lipo_equals_double_loop():
  pol, ref, _ = _lists()
  with jax.enable_x64(True):
    loss, _ = _call("lipo", pol, ref, beta=BETA)
  assert float(loss) == pytest.approx(lipo_by_loops(BETA * (pol - ref), PSI, VALID), rel=1e-12)


def test_lipo_lambda_weights_are_constant():
  """The gradient is that of sum Delta_ij (-log sig(s_i - s_j)) with Delta frozen at its current value."""
  pol, ref, _ = _lists(1)
  with jax.enable_x64(True):
    s = BETA * (pol - ref)
    delta = losses._listwise.lambda_weights(jnp.asarray(s), jnp.asarray(PSI), jnp.asarray(VALID))
    frozen = lambda p: -(delta * jax.nn.log_sigmoid(
        BETA * ((p - ref)[:, :, None] - (p - ref)[:, None, :]))).sum() / 3
    g = jax.grad(lambda p: _call("lipo", p, ref, beta=BETA)[0])(jnp.asarray(pol))
    np.testing.assert_allclose(g, jax.grad(frozen)(jnp.asarray(pol)), rtol=1e-12, atol=1e-15)
  assert np.all(np.asarray(g)[1, 3] == 0.0)  # padded entry


def test_lipo_ties_contribute_nothing():
  pol, ref, _ = _lists(2)
  tied = np.array([[1.0, 1.0, 1.0, 1.0]] * 3)
  with jax.enable_x64(True):
    loss, _ = _call("lipo", pol, ref, psi=tied, beta=BETA)
  assert float(loss) == 0.0


@pytest.mark.parametrize("psi_c, psi_r", [(1.0, 0.0), (3.0, 1.0), (0.5, 0.2)])
def test_lipo_with_two_items_is_scaled_dpo(psi_c, psi_r):
  """K = 2: Delta = |2^psi_c - 2^psi_r| (1 - 1/log2 3) whatever the scores, so LiPO = Delta * DPO."""
  rng = np.random.default_rng(3)
  pol, ref = rng.normal(size=(5, 2)) * 3 - 8, rng.normal(size=(5, 2)) * 3 - 8
  psi = np.tile([psi_c, psi_r], (5, 1))
  scale = abs(2 ** psi_c - 2 ** psi_r) * (1 - 1 / math.log2(3))
  with jax.enable_x64(True):
    lipo, _ = _call("lipo", pol, ref, psi=psi, valid=np.ones((5, 2), bool), beta=BETA)
    outputs = lambda lp: {"logps": jnp.asarray(lp), "lengths": jnp.ones((5, 2))}
    dpo, _ = losses.dpo_loss(outputs(pol), outputs(ref), {}, ml_collections.ConfigDict({"beta": BETA}))
  assert float(lipo) == pytest.approx(scale * float(dpo), rel=1e-12)


def test_listmle_hand_computed():
  """s = (1, 0, 2), labels order them (0, 1, 2):
  L = -[(1 - log(e + 1 + e^2)) + (0 - log(1 + e^2)) + (2 - 2)] = 3.534534..."""
  expected = -((1 - math.log(math.e + 1 + math.e ** 2)) + (0 - math.log(1 + math.e ** 2)))
  assert expected == pytest.approx(3.534534, abs=1e-6)
  pol = np.array([[1.0, 0.0, 2.0, 50.0]])
  with jax.enable_x64(True):
    # beta = 1 and a zero reference make s the policy log-probs; the 4th entry is padding.
    loss, _ = _call("listmle", pol, np.zeros_like(pol), psi=np.array([[2.0, 1.0, 0.0, 9.0]]),
                    valid=np.array([[1, 1, 1, 0]], bool), beta=1.0)
    # The same list given in another order, labels permuted with it.
    perm, _ = _call("listmle", pol[:, [2, 0, 1]], np.zeros((1, 3)), psi=np.array([[0.0, 2.0, 1.0]]),
                    valid=np.ones((1, 3), bool), beta=1.0)
  assert float(loss) == pytest.approx(expected, rel=1e-12)
  assert float(perm) == pytest.approx(expected, rel=1e-12)


def test_listmle_matches_plackett_luce_loops():
  pol, ref, _ = _lists(4)
  psi = np.array([[2.0, 0.0, 1.0, 3.0], [1.0, 3.0, 0.0, 2.0], [0.0, 4.0, 1.0, 2.0]])  # no ties
  s = BETA * (pol - ref)
  want = 0.0
  for b in range(3):
    order = [i for i in np.argsort(-psi[b]) if VALID[b, i]]
    for k in range(len(order)):
      rest = [s[b, j] for j in order[k:]]
      want -= s[b, order[k]] - math.log(sum(math.exp(x) for x in rest))
  with jax.enable_x64(True):
    loss, _ = _call("listmle", pol, ref, psi=psi, beta=BETA)
  assert float(loss) == pytest.approx(want / 3, rel=1e-12)


def test_listnet_matches_formula():
  pol, ref, _ = _lists(5)
  s = BETA * (pol - ref)
  want = 0.0
  for b in range(3):
    idx = [i for i in range(4) if VALID[b, i]]
    zt = sum(math.exp(PSI[b, i] / 2.0) for i in idx)
    zs = sum(math.exp(s[b, i]) for i in idx)
    want -= sum(math.exp(PSI[b, i] / 2.0) / zt * (s[b, i] - math.log(zs)) for i in idx)
  with jax.enable_x64(True):
    loss, _ = _call("listnet", pol, ref, beta=BETA, listnet_temperature=2.0)
  assert float(loss) == pytest.approx(want / 3, rel=1e-12)


def pro_by_loops(r, logps, psi, valid, sft_weight):
  """PRO as in the reference code for a label-sorted list, generalised to ties (strictly worse only)."""
  total = 0.0
  for b in range(r.shape[0]):
    idx = sorted([i for i in range(r.shape[1]) if valid[b, i]], key=lambda i: -psi[b, i])
    for k in idx:
      neg = [j for j in idx if psi[b, j] < psi[b, k]]
      if not neg:
        continue
      temps = [psi[b, k] - psi[b, j] for j in neg]
      t_k = max(temps)
      z = math.exp(r[b, k] * t_k) + sum(math.exp(r[b, j] * t) for j, t in zip(neg, temps))
      total += math.log(z) - r[b, k] * t_k
    total += sft_weight * (len(idx) - 1) ** 2 * -logps[b, idx[0]]
  return total / r.shape[0]


def test_pro_matches_reference_loops():
  pol, _, lengths = _lists(6)
  pol[1, 3] = -7.0
  psi = np.array([[2.0, 0.0, 1.0, 3.0], [1.0, 3.0, 0.0, 2.0], [0.0, 0.0, 1.0, 2.0]])
  with jax.enable_x64(True):
    loss, _ = _call("pro", pol, None, psi=psi, lengths=lengths, sft_weight=0.05)
  want = pro_by_loops(pol / lengths, pol, psi, VALID, 0.05)
  assert float(loss) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", ["lipo", "listnet", "listmle", "pro"])
def test_finite_gradients_with_padding(name):
  pol, ref, lengths = _lists(7)
  grad = jax.grad(lambda p: _call(name, p, ref, lengths=lengths, beta=BETA)[0])(jnp.asarray(pol,
                                                                                          jnp.float32))
  g = np.asarray(grad)
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
  assert g[1, 3] == 0.0


@pytest.mark.parametrize("name", ["lipo", "listnet", "listmle", "pro"])
def test_ranking_the_labels_lowers_the_loss(name):
  """Scores agreeing with the labels give a lower loss than scores reversing them."""
  psi = np.array([[3.0, 2.0, 1.0, 0.0]])
  good, bad = np.array([[0.0, -1.0, -2.0, -3.0]]), np.array([[-3.0, -2.0, -1.0, 0.0]])
  valid = np.ones((1, 4), bool)
  lo = _call(name, good, np.zeros((1, 4)), psi=psi, valid=valid, beta=1.0, sft_weight=0.0)[0]
  hi = _call(name, bad, np.zeros((1, 4)), psi=psi, valid=valid, beta=1.0, sft_weight=0.0)[0]
  assert float(lo) < float(hi)
  acc = _call(name, good, np.zeros((1, 4)), psi=psi, valid=valid, beta=1.0)[1]["rewards/accuracies"]
  assert float(acc) == 1.0
