"""The outlier calibration (`diagnostics/_outliers.py`) against direct numpy evaluations of OWL's formulas.

s_j is checked on layer 0, whose linear inputs are computable in numpy from the embedding and the norm
scale alone; D_l is checked by explicit per-sublayer loops in torch's [out, in] layout (A_ij = |W_ij| *
sqrt(s_j) with j the input column), on a tiny model whose norm scales carry planted outlier channels so that
the blocks differ and a transposed score would not even broadcast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diagnostics
import models

L = 3
CFG = models.DecoderConfig.tiny(vocab_size=61, num_layers=L)   # D=64, F=176: q/o/gate/up/down not square
SUBLAYERS = (("attn", "q_proj", "attn_in"), ("attn", "k_proj", "attn_in"), ("attn", "v_proj", "attn_in"),
             ("attn", "o_proj", "o_proj_in"), ("mlp", "gate_proj", "mlp_in"), ("mlp", "up_proj", "mlp_in"),
             ("mlp", "down_proj", "down_proj_in"))


def _model_and_params():
  model = models.Decoder(CFG)
  params = model.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # Planted outlier channels (as in trained LLMs): a few large norm-scale entries per block, more in deeper
  # blocks, so the blocks' outlier ratios differ.
  for name in ("attn_norm", "mlp_norm"):
    scale = np.ones((L, CFG.hidden_size), np.float32)
    for l in range(L):
      scale[l, rng.choice(CFG.hidden_size, 2 + 3 * l, replace=False)] = 6.0
    params["layers"][name]["scale"] = jnp.asarray(scale)
  return model, params


def _batches():
  rng = np.random.default_rng(1)
  out = []
  for B in (3, 2):
    tokens = rng.integers(3, CFG.vocab_size, (B, 10))
    seg = np.ones((B, 10), np.int32)
    seg[0, 7:] = 0                                         # padding: not counted
    out.append({"inputs": tokens, "segment_ids": seg,
                "positions": np.broadcast_to(np.arange(10), (B, 10)).copy()})
  return out


def test_channel_norms_of_layer0_match_numpy():
  model, params = _model_and_params()
  batches = _batches()
  norms = diagnostics.channel_norms(model, params, batches)
  assert {k: v.shape for k, v in norms.items()} == {
      "attn_in": (L, 64), "o_proj_in": (L, 64), "mlp_in": (L, 64), "down_proj_in": (L, 176)}
  emb = np.asarray(params["embed"]["embedding"], np.float64)
  scale = np.asarray(params["layers"]["attn_norm"]["scale"][0], np.float64)
  total, rows = np.zeros(64), 0
  for b in batches:
    for tokens, seg in zip(b["inputs"], b["segment_ids"]):
      x = emb[tokens[seg != 0]]                                            # [real tokens, D]
      h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG.norm_eps) * scale
      total += np.sum(h * h, axis=0)                                       # ||X_j||^2 of this sample
      rows += 1
  np.testing.assert_allclose(norms["attn_in"][0], total / rows, rtol=2e-5)   # mean over the 5 samples


@pytest.mark.parametrize("M", [3.0, 5.0])
def test_outlier_ratios_match_explicit_per_sublayer_loops(M):
  model, params = _model_and_params()
  batches = _batches()
  got = diagnostics.outlier_ratios(model, params, batches, M=M)
  norms = diagnostics.channel_norms(model, params, batches)
  want, numel = [], None
  for l in range(L):
    scores = []
    for group, name, stat in SUBLAYERS:
      w_torch = np.asarray(params["layers"][group][name]["kernel"][l], np.float64).T     # [out, in]
      s = np.asarray(norms[stat][l], np.float64)                                       # [in]
      a = np.empty_like(w_torch)
      for i in range(w_torch.shape[0]):
        for j in range(w_torch.shape[1]):
          a[i, j] = abs(w_torch[i, j]) * np.sqrt(s[j])
      scores.append(a.ravel())
    a = np.concatenate(scores)
    numel = a.size
    want.append(100.0 * np.sum(a > M * a.mean()) / a.size)
  # float32 scores may flip an element sitting on the threshold: one element is 100/numel percent.
  np.testing.assert_allclose(got, want, rtol=0, atol=1.01 * 100.0 / numel)
  assert np.ptp(want) > 0.5 and min(want) > 0       # the planted channels make the blocks differ


def test_outlier_ratio_is_scale_invariant_and_rises_with_outliers():
  model, params = _model_and_params()
  batches = _batches()
  d = diagnostics.outlier_ratios(model, params, batches)
  scaled = jax.tree.map(lambda x: x, params)
  for group, name, _ in SUBLAYERS:
    scaled["layers"][group][name]["kernel"] = 3.0 * params["layers"][group][name]["kernel"]
  norms = diagnostics.channel_norms(model, params, batches)
  np.testing.assert_allclose(diagnostics.outlier_distribution(scaled, norms), d, atol=1e-9)
  # A planted outlier row (one input channel of block 0's up_proj ten times larger) adds outliers there only.
  planted = jax.tree.map(lambda x: x, params)
  k = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]).copy()
  k[0, 5, :] *= 10.0
  planted["layers"]["mlp"]["up_proj"]["kernel"] = jnp.asarray(k)
  d2 = diagnostics.outlier_distribution(planted, norms)
  numel = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176
  assert d2[0] > d[0] + 100.0 * 50 / numel and np.allclose(d2[1:], d[1:])   # >= 50 of the 176 new ones


def test_bad_threshold_raises():
  model, params = _model_and_params()
  with pytest.raises(ValueError, match="M must be > 0"):
    diagnostics.outlier_ratios(model, params, _batches(), M=0.0)
