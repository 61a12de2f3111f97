"""The tiled head (losses/_chunked.py) equals the full float32 logits in value and gradient: the primitive's
statistics against their definitions (chunks that divide neither the tokens nor the vocabulary, soft-capping,
the tied [V, D] layout, every cotangent at once), and `model_outputs`, NLL with z-loss, DPO, WPO and
DPO-Kernels' last-token logits on a tiny decoder with packed, padded rows, tied embeddings and a LoRA on
lm_head, against `logits_chunk=0`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import models
import peft
from losses._chunked import token_stats, weight_tile

RTOL = 1e-5
ALL = ("logp", "logz", "entropy", "log_sum_sq")


def _reference_stats(h, w, y, vocab_axis=1, softcap=None):
  z = h @ (w if vocab_axis == 1 else w.T)
  if softcap is not None:
    z = softcap * jnp.tanh(z / softcap)
  logp = jax.nn.log_softmax(z)
  return {"logp": jnp.take_along_axis(logp, y[:, None], -1)[:, 0], "logz": jax.nn.logsumexp(z, -1),
          "entropy": -(jnp.exp(logp) * logp).sum(-1), "log_sum_sq": jax.nn.logsumexp(2.0 * logp, -1)}


def _close(a, b, rtol=RTOL):
  """Each leaf within rtol of the tree's largest entry: float32 sums in another order differ by rounding,
  which is relative to the terms summed, not to a result that cancels to near zero (one DPO-Kernels
  gradient entry of 2e-6 differed by 3e-11 between the two orders)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  top = max(float(np.abs(np.asarray(y, np.float64)).max()) for y in lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(top, 1e-30))


@pytest.mark.parametrize("chunk,vocab_axis,softcap", [(4, 1, None), (5, 0, 2.5), (64, 1, None)])
def test_token_stats_value_and_gradient(chunk, vocab_axis, softcap):
  N, D, V = 13, 8, 37          # 13 tokens and 37 entries: chunks 4 and 5 divide neither
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  h = jax.random.normal(k[0], (N, D))
  w = jax.random.normal(k[1], (D, V) if vocab_axis == 1 else (V, D))
  y = jax.random.randint(k[2], (N,), 0, V)
  cot = jax.random.normal(k[3], (len(ALL), N))

  @functools.partial(jax.jit, static_argnums=2)
  def everything(h, w, tiled):
    stats = ((lambda h, w: token_stats(h, w, y, chunk=chunk, vocab_axis=vocab_axis, softcap=softcap, want=ALL))
             if tiled else (lambda h, w: _reference_stats(h, w, y, vocab_axis, softcap)))
    weighted = lambda h, w: sum((cot[i] * stats(h, w)[name]).sum() for i, name in enumerate(ALL))
    # Each statistic's own gradient too, so that a wrong term cannot hide behind another's.
    own = {name: jax.grad(lambda h, w: stats(h, w)[name].sum(), (0, 1))(h, w) for name in ALL}
    return stats(h, w), jax.grad(weighted, (0, 1))(h, w), own

  _close(everything(h, w, True), everything(h, w, False))


def test_token_stats_frozen_weight_and_jit():
  N, D, V = 9, 4, 11
  h, w = jax.random.normal(jax.random.PRNGKey(1), (N, D)), jax.random.normal(jax.random.PRNGKey(2), (D, V))
  y = jnp.arange(N) % V
  f = jax.jit(jax.grad(lambda h: token_stats(h, jax.lax.stop_gradient(w), y, chunk=3)["logp"].sum()))
  _close(f(h), jax.grad(lambda h: _reference_stats(h, w, y)["logp"].sum())(h))
  with pytest.raises(ValueError, match="unknown statistics"):
    token_stats(h, w, y, chunk=3, want=("logits",))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("axis", [0, 1])
def test_weight_tile_is_the_slice(dtype, axis):
  """Tile j of W (a switch over static slices for 16-bit W, a dynamic slice otherwise) is W's columns (or rows)
  [j t, j t + t), the last tile shifted back to end at V = 37 (t = 5 divides it not)."""
  V, t = 37, 5
  w = jnp.arange(V * 3, dtype=jnp.float32).reshape((3, V) if axis == 1 else (V, 3)).astype(dtype)
  tiles = jax.jit(lambda w: jnp.stack([weight_tile(w, jnp.int32(j), t, axis) for j in range(-(-V // t))]))(w)
  for j in range(-(-V // t)):
    start = min(j * t, V - t)
    np.testing.assert_array_equal(np.asarray(tiles[j]), np.asarray(jax.lax.slice_in_dim(w, start, start + t, axis=axis)))


def test_bf16_head_temporaries_flat_in_vocabulary():
  """The compiled temporaries of a bf16 tiled head's value and gradient do not grow with V (XLA:CPU once
  hoisted a float32 copy of the whole W out of the tile loop: 16 MiB at V = 65536 here, 16x a tile)."""
  N, D, chunk = 1024, 64, 1024

  def temp(V):   # a frozen head, as in a LoRA step: no dW [D, V] among the outputs
    f = jax.jit(jax.grad(lambda h, w, y: token_stats(h, w, y, chunk=chunk)["logp"].sum()))
    c = f.lower(jax.ShapeDtypeStruct((N, D), jnp.bfloat16), jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
                jax.ShapeDtypeStruct((N,), jnp.int32)).compile()
    return c.memory_analysis().temp_size_in_bytes

  small, large = temp(8 * chunk), temp(64 * chunk)
  assert large <= 1.25 * small, (small, large)


# ---- the model path ---------------------------------------------------------------------------------------
B, K, T, V = 2, 2, 11, 45


def _batch():
  """[B, K, T] preference rows: a packed row (two documents) and a padded one; completion masks."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, size=(B, K, T + 1))
  seg = np.ones((B, K, T), np.int32)
  seg[0, :, 6:] = 2                        # row 0 packs two documents
  seg[1, :, 8:] = 0                        # row 1 ends in padding
  pos = np.where(seg == 2, np.arange(T) - 6, np.arange(T))
  mask = np.zeros((B, K, T), np.float32)
  mask[:, :, 3:] = 1.0
  mask[seg == 0] = 0.0
  mask[:, 1, 9:] = 0.0                     # completions of different lengths
  return {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:]),
          "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}


def _models(chunk, **kw):
  cfg = models.DecoderConfig.tiny(vocab_size=V, num_layers=1, **kw)
  return models.Decoder(cfg.replace(logits_chunk=0)), models.Decoder(cfg.replace(logits_chunk=chunk))


@pytest.mark.parametrize("tie,lora_head", [(False, False), (True, False), (False, True)])
def test_model_outputs_value_and_gradient(tie, lora_head):
  full, tiled = _models(chunk=8, tie_embeddings=tie)          # 8 divides neither T*B*K = 44 nor V = 45
  params = full.init(jax.random.PRNGKey(0))
  if lora_head:
    params = peft.apply(params, {"lm_head": peft.AdapterSpec(method="lora", rank=2, init="gaussian")})
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].replace(
        b=0.1 * jax.random.normal(jax.random.PRNGKey(3), params["lm_head"]["kernel"].b.shape))
  trainable, frozen = peft.split(params)
  batch = _batch()
  needs = frozenset({"logz", "last_logits", "log_sum_sq_probs", "embeddings"})
  keys = ("token_logps", "logps", "logz", "last_logits", "log_sum_sq_probs", "embeddings")
  coef = {k: jax.random.normal(jax.random.PRNGKey(i), s.shape) for i, (k, s) in enumerate(
      jax.eval_shape(lambda: losses.model_outputs(full, params, batch, needs)).items()) if k in keys}

  def run(model):
    outputs = lambda t: losses.model_outputs(model, peft.combine(t, frozen), batch, needs)
    scalar = lambda t: sum((coef[k] * outputs(t)[k]).sum() for k in keys)
    return jax.jit(lambda t: (outputs(t), jax.grad(scalar)(t)))(trainable)

  (a, ga), (b, gb) = run(full), run(tiled)
  assert set(a) == set(b)
  _close({k: a[k] for k in keys}, {k: b[k] for k in keys})
  _close(ga, gb)
  if lora_head:    # the head's adapter is trained through the tiled path
    assert float(jnp.abs(gb["lm_head"]["kernel"].a).max()) > 1e-3


@pytest.mark.parametrize("name,cfg", [("nll", {"z_loss": 1e-2}), ("dpo", {"beta": 0.1, "use_weighting": True}),
                                      ("dpo_kernels", {"beta": 0.1, "kernel": "rbf", "divergence": "js"})])
def test_losses_value_and_gradient(name, cfg):
  import ml_collections
  full, tiled = _models(chunk=16)
  entry = losses.get(name)
  loss_cfg = ml_collections.ConfigDict({"name": name, **cfg})
  params = peft.apply(full.init(jax.random.PRNGKey(1)),
                      {"all-linear": peft.AdapterSpec(method="lora", rank=2, init="gaussian")})
  trainable, frozen = peft.split(params)
  batch = _batch()
  if entry.kind == "sft":
    batch = jax.tree.map(lambda x: x[:, :1], batch)
  needs = entry.needs_for(loss_cfg)

  def loss(model):
    def fn(t):
      p = peft.combine(t, frozen)
      ref = jax.lax.stop_gradient(losses.model_outputs(model, peft.strip(p), batch, needs))
      return entry.fn(losses.model_outputs(model, p, batch, needs), ref, batch, loss_cfg)[0]
    return fn

  # A step away from the base first, so that the policy and the reference differ.
  run = lambda model: jax.jit(lambda t: jax.value_and_grad(loss(model))(
      jax.tree.map(lambda x, g: x - 0.5 * g, t, jax.grad(loss(full))(t))))(trainable)
  (la, ga), (lb, gb) = run(full), run(tiled)
  _close(la, lb)
  _close(ga, gb)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gb)) > 1e-4


def test_full_logits_and_head_dropout_fall_back():
  full, tiled = _models(chunk=8)
  params = full.init(jax.random.PRNGKey(0))
  batch = _batch()
  logps = lambda model, p, needs=frozenset(): jax.jit(
      lambda p: losses.model_outputs(model, p, batch, needs))(p)
  out = logps(tiled, params, frozenset({"logits"}))
  assert out["logits"].shape == (B, K, T, V)
  _close(out["token_logps"], logps(full, params)["token_logps"])
  drop = peft.apply(params, {"lm_head": peft.AdapterSpec(method="lora", rank=2, dropout=0.5)})
  drop = peft.with_dropout_rng(drop, jax.random.PRNGKey(0))
  assert tiled.output_head(drop) is None       # input dropout is no single matrix: the full head is used
  _close(logps(tiled, drop)["token_logps"], logps(full, drop)["token_logps"])


def test_config_key_reaches_the_model():
  from configs import common
  from train_lib import build
  c = common.base_config()
  assert "logits_chunk" not in build._model_overrides(c.model)      # unset: the model's own default
  assert models.DecoderConfig.tiny().logits_chunk > 0                 # tiled by default
  c.model.logits_chunk = 0
  assert models.DecoderConfig.tiny(**build._model_overrides(c.model)).logits_chunk == 0
  with pytest.raises(ValueError, match="logits_chunk"):
    models.DecoderConfig.tiny(logits_chunk=-1)
