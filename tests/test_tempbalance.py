"""TempBalance / Model Balancing: the alpha -> multiplier maps, the schedules, and the optax transforms
(updates = base updates x multipliers; a refresh rewrites the state without retracing the step)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diagnostics as dg
import optim
import peft
from optim import _tempbalance as tb

ALPHAS = np.asarray([2.0, 3.0, 4.0, 6.0])


# ---------------------------------------------------------------------------------------------------
# Mappings: hand-computed values
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray, lambda a: jax.jit(lambda x: x)(jnp.asarray(a))])
def test_mappings_equal_their_formulas(to_array):
  a = to_array(ALPHAS)
  close = lambda x, y: np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6)
  close(tb.tb_linear_map(a), [0.5, 0.75, 1.0, 1.5])                     # 0.5 + (a - 2) / 4
  close(tb.linear_map(a, lr_min_ratio=0.2, lr_slope=2.0), [0.2, 0.7, 1.2, 2.2])
  close(tb.tb_sqrt(a), [0.7447389904335456, 0.9121152590588346, 1.053219980699167, 1.289925769808453])
  close(tb.tb_log2(a), [0.5578858913022597, 0.8842282173954806, 1.1157717826045195, 1.4421141086977403])
  close(tb.tb_step(to_array(np.asarray([3.0, 2.0, 6.0, 4.0]))), [0.75, 0.5, 1.25, 1.0])   # 0.5 + rank / 4
  close(tb.rank_map(to_array(np.asarray([3.0, 2.0, 6.0, 4.0])), 0.3, 0.4), [0.4, 0.3, 0.6, 0.5])
  # mean 3.75; d = (-1.75, -0.75, 0.25, 2.25); 10^(s (sigmoid(T d) - 1/2)), s = 2 below, 1 above the mean.
  close(tb.sigmoid_map(a), [0.10000001156357882, 0.10025488825901092, 2.6554725717958516,
                            3.1622776589364388])
  close(tb.tb_std_sigmoid(a, temp=1.0), [0.19773993909880153, 0.4381699617246658, 1.153922126078106,
                                         2.538928876681907])
  close(tb.normalize_mean(tb.tb_linear_map(a)), np.asarray([0.5, 0.75, 1.0, 1.5]) / 0.9375)
  close(tb.tb_linear_map(to_array(np.full(3, 2.7))), [1.0, 1.0, 1.0])   # no spread, no preference


def _record(path, layer, alpha, skipped=None):
  nan = float("nan")
  return dg.EsdRecord(path, layer, (64, 64), 64, 64, alpha, nan, nan, nan, 32, {}, skipped, dg.EsdConfig())


def test_schedule_block_sigmoid():
  """Model Balancing `tb_layer_blocks` + `sigmoid`: block means, then one factor per block."""
  records = [_record("layers/attn/q_proj/kernel", 0, 2.0), _record("layers/mlp/up_proj/kernel", 0, 4.0),
             _record("layers/attn/q_proj/kernel", 1, 5.0), _record("layers/mlp/up_proj/kernel", 1, 9.0,
                                                                   skipped="eigs_thresh"),
             _record("layers/attn/q_proj/kernel", 2, 3.5), _record("lm_head/kernel", None, 1.0)]
  config = tb.TempBalanceConfig.model_balancing(exp_temp=1.0)
  sched = tb.schedule(None, config, records=records)
  # block means (3, 5, 3.5), mean 23/6: d = (-5/6, 7/6, -1/3)
  d = np.asarray([3.0, 5.0, 3.5]) - 23 / 6
  expected = 10 ** (np.where(d > 0, 1.0, 2.0) * (1 / (1 + np.exp(-d)) - 0.5))
  np.testing.assert_allclose([sched.per_block[b] for b in range(3)], expected, rtol=1e-12)
  assert sched.per_record[("layers/mlp/up_proj/kernel", 0)] == sched.per_block[0]
  assert ("layers/mlp/up_proj/kernel", 1) not in sched.per_record
  assert ("lm_head/kernel", None) not in sched.per_record

  spread = tb.schedule(None, config.replace(block_unit="layer"), records=records)
  np.testing.assert_allclose([spread.per_record[("layers/attn/q_proj/kernel", 0)],
                              spread.per_record[("layers/mlp/up_proj/kernel", 0)]],
                             [0.5 * expected[0], 1.5 * expected[0]], rtol=1e-12)

  # tb_lr_normalize: the mean over the analysed matrices becomes 1; lm_head enters at 1 and is rescaled.
  norm = tb.schedule(None, config.replace(normalize=True), records=records)
  scale = 1 / np.mean([expected[0], expected[0], expected[1], expected[2], 1.0])
  np.testing.assert_allclose(norm.per_record[("lm_head/kernel", None)], scale, rtol=1e-12)
  np.testing.assert_allclose([norm.per_block[b] for b in range(3)], scale * expected, rtol=1e-12)
  np.testing.assert_allclose(np.mean(list(norm.per_record.values())), 1.0, rtol=1e-12)


def test_schedule_layer_skips_excluded_records():
  records = [_record("a/kernel", None, 2.0, "first"), _record("b/kernel", None, 3.0),
             _record("c/kernel", None, 5.0), _record("d/kernel", None, 4.0), _record("e/kernel", None, 9.0, "last")]
  sched = tb.schedule(None, tb.TempBalanceConfig.tempbalance(), records=records)
  assert sched.per_record == {("b/kernel", None): 0.5, ("c/kernel", None): 1.5, ("d/kernel", None): 1.0}


def test_tb_layer_groups_is_not_offered():
  with pytest.raises(ValueError, match="assign"):
    tb.TempBalanceConfig(assign="tb_layer_groups")


# ---------------------------------------------------------------------------------------------------
# The optax transforms
# ---------------------------------------------------------------------------------------------------
def _params(seed=0, L=3, D=48):
  """A decoder-shaped tree whose stacked q_proj slices have clearly different tails."""
  rng = np.random.default_rng(seed)
  q = np.stack([rng.standard_t(dof, size=(D, D)) for dof in (1.5, 3.0, 12.0)[:L]])
  return {"embed": {"embedding": jnp.asarray(rng.standard_normal((32, D)), jnp.float32)},
          "layers": {"attn": {"q_proj": {"kernel": jnp.asarray(q, jnp.float32),
                                         "bias": jnp.asarray(rng.standard_normal((L, D)), jnp.float32)}},
                     "attn_norm": {"scale": jnp.ones((L, D), jnp.float32)}},
          "lm_head": {"kernel": jnp.asarray(rng.standard_t(4, size=(D, 40)), jnp.float32)}}


def _config(**kw):
  esd = dg.EsdConfig(eigs_thresh=10, precision="float64")
  return tb.TempBalanceConfig(esd=esd, **kw)


def _grads(params, seed=1):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
  return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)


def test_updates_equal_base_updates_times_multipliers():
  params, grads = _params(), _grads(_params())
  base = optax.adamw(1e-2, weight_decay=0.1)
  tx = optim.tempbalance(base)
  config = _config(assign="tb_linear_map")
  state = optim.refresh_multipliers(tx.init(params), params, config)
  mult = state[1].multipliers

  records = dg.analyze(params, config.esd)
  alphas = [r.alpha for r in records if r.path == "layers/attn/q_proj/kernel"]
  assert alphas[0] < alphas[1] < alphas[2]         # heavier tails fit smaller alphas
  a = np.asarray(alphas)
  np.testing.assert_allclose(mult["layers"]["attn"]["q_proj"]["kernel"],
                             0.5 + (a - a.min()) / (a.max() - a.min()), rtol=1e-6)
  assert mult["layers"]["attn"]["q_proj"]["kernel"].shape == (3,)
  # The bias follows its module's matrix; leaves without an ESD keep 1.
  np.testing.assert_array_equal(mult["layers"]["attn"]["q_proj"]["bias"], mult["layers"]["attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(mult["layers"]["attn_norm"]["scale"], np.ones(3))
  assert float(mult["embed"]["embedding"]) == 1.0 and float(mult["lm_head"]["kernel"]) == 1.0

  u_tb, _ = tx.update(grads, state, params)
  u_base, _ = base.update(grads, base.init(params), params)
  expected = jax.tree.map(lambda u, f: u * f.reshape(f.shape + (1,) * (u.ndim - f.ndim)), u_base, mult)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), u_tb, expected)
  # The decoupled decay is scaled as well: with zero gradients only the decay term remains.
  zeros = jax.tree.map(jnp.zeros_like, grads)
  u0, _ = tx.update(zeros, state, params)
  q, f = params["layers"]["attn"]["q_proj"]["kernel"], mult["layers"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(u0["layers"]["attn"]["q_proj"]["kernel"], -1e-2 * 0.1 * q * f[:, None, None],
                             rtol=1e-5)


def test_refresh_does_not_retrace_the_step():
  params = _params()
  tx = optim.tempbalance(optax.adam(1e-2))
  traces = []

  @jax.jit
  def step(params, opt_state, grads):
    traces.append(None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates

  grads = _grads(params)
  p1, s1, _ = step(params, tx.init(params), grads)
  refreshed = optim.refresh_multipliers(s1, p1, _config(assign="tb_sqrt"))
  before = s1[1].multipliers["layers"]["attn"]["q_proj"]["kernel"]
  after = refreshed[1].multipliers["layers"]["attn"]["q_proj"]["kernel"]
  assert np.all(np.asarray(before) == 1.0) and not np.allclose(after, 1.0)
  _, _, scaled = step(p1, refreshed, grads)
  _, _, plain = step(p1, s1, grads)
  assert len(traces) == 1                          # same shapes, dtypes and structure: no retrace
  np.testing.assert_allclose(scaled["layers"]["attn"]["q_proj"]["kernel"],
                             plain["layers"]["attn"]["q_proj"]["kernel"] * np.asarray(after)[:, None, None],
                             rtol=1e-6)


def test_weight_decay_variant():
  params, grads = _params(), _grads(_params())
  tx = tb.adamw_layerwise_wd(1e-2, weight_decay=0.1)
  plain = optax.adamw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  u, _ = tx.update(grads, state, params)
  u_ref, _ = plain.update(grads, plain.init(params), params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u, u_ref)   # f = 1: plain AdamW

  config = _config(assign="tb_linear_map", hyperparam="wd")
  state = optim.refresh_multipliers(state, params, config)
  f = state[1].multipliers["layers"]["attn"]["q_proj"]["kernel"]
  assert not np.allclose(f, 1.0)
  u0, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(u0["layers"]["attn"]["q_proj"]["kernel"], -1e-2 * 0.1 * q * f[:, None, None],
                             rtol=1e-5)
  # hyperparam='wd' leaves a layerwise-LR state alone; 'hybrid' writes both.
  both = optax.chain(tx, optim.scale_by_layerwise_lr())
  s = both.init(params)
  s_wd = optim.refresh_multipliers(s, params, config)
  assert np.all(np.asarray(s_wd[1].multipliers["layers"]["attn"]["q_proj"]["kernel"]) == 1.0)
  s_hy = optim.refresh_multipliers(s, params, config.replace(hyperparam="hybrid"))
  np.testing.assert_allclose(s_hy[1].multipliers["layers"]["attn"]["q_proj"]["kernel"], f)


def test_model_balancing_blocks_cover_every_leaf_of_the_block():
  params = _params()
  config = _config(assign="sigmoid", granularity="block")
  tx = optim.tempbalance(optax.sgd(0.1))
  state = optim.refresh_multipliers(tx.init(params), params, config)
  mult = state[1].multipliers
  block_alpha = dg.block_alphas(dg.analyze(params, config.esd))
  d = block_alpha - block_alpha.mean()
  expected = 10 ** (np.where(d > 0, 1.0, 2.0) * (1 / (1 + np.exp(-10 * d)) - 0.5))
  for leaf in (mult["layers"]["attn"]["q_proj"]["kernel"], mult["layers"]["attn"]["q_proj"]["bias"],
               mult["layers"]["attn_norm"]["scale"]):
    np.testing.assert_allclose(leaf, expected, rtol=1e-6)
  assert float(mult["lm_head"]["kernel"]) == 1.0 and float(mult["embed"]["embedding"]) == 1.0


@flax.struct.dataclass
class _Lora(peft.Adapter):
  base: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  trainable_fields = ("a", "b")

  def dot(self, x):
    return x @ self.base + self.scale * (x @ self.a) @ self.b

  def materialize(self):
    return self.base + self.scale * self.a @ self.b


def test_adapter_leaves_follow_the_merged_alpha():
  params = _params()
  rng = np.random.default_rng(3)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  node = _Lora(q, jnp.asarray(rng.standard_normal((3, 48, 4)), jnp.float32),
               jnp.asarray(rng.standard_normal((3, 4, 48)), jnp.float32), 2.0)
  params["layers"]["attn"]["q_proj"]["kernel"] = node
  trainable, _ = peft.split(params)
  tx = optim.tempbalance(optax.adam(1e-3))
  config = _config(assign="tb_linear_map")
  state = optim.refresh_multipliers(tx.init(trainable), params, config)
  kernel_mult = state[1].multipliers["layers"]["attn"]["q_proj"]["kernel"]
  merged = [r.alpha for r in dg.analyze(peft.merge(params), config.esd) if r.path.endswith("q_proj/kernel")]
  expected = tb.tb_linear_map(np.asarray(merged))
  np.testing.assert_allclose(kernel_mult.a, expected, rtol=1e-6)
  np.testing.assert_allclose(kernel_mult.b, expected, rtol=1e-6)
  grads = _grads(trainable)
  u, _ = tx.update(grads, state, trainable)
  u_base, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(trainable), trainable)
  np.testing.assert_allclose(u["layers"]["attn"]["q_proj"]["kernel"].b,
                             u_base["layers"]["attn"]["q_proj"]["kernel"].b * expected[:, None, None], rtol=1e-5)
