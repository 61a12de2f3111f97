"""DPO-Kernels against the paper and its reference code: the exact prompt embedding, Mahalanobis with a
given / learned Sigma^-1, Wasserstein with a token-embedding ground cost against an exact OT solution,
the faithful objective against a float64 evaluation, the frozen-encoder source end to end."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import data
import losses
import models
from losses import _divergences as dv
from losses import _dpo_kernels as dk
from losses import _kernels as kr
from losses._outputs import prompt_positions

TOK = data.CharTokenizer()


def _pref_batch(records, seq_len=16):
  cfg = data.default_config()
  cfg.update({"pref_kind": "pairwise", "tokenizer": "char"})
  recs = [data.PreferenceRecord(p, (c, r)) for p, c, r in records]
  return data.preference_batch(recs, cfg, tokenizer=TOK, seq_len=seq_len)


def _tiny_model(seed=0, **kw):
  model = models.Decoder(models.DecoderConfig.tiny(vocab_size=TOK.vocab_size, num_layers=1, **kw))
  return model, model.init(jax.random.PRNGKey(seed))


# ------------------------------------------------------------------------------------------------
# The prompt embedding pools over the prompt's input positions only.
# ------------------------------------------------------------------------------------------------
def test_prompt_positions_are_bos_and_prompt_tokens():
  batch = _pref_batch([("ab", "xy", "y"), ("abcd", "x", "yyy")])
  for b, prompt in enumerate(("ab", "abcd")):
    for k in range(2):
      pos = np.asarray(prompt_positions(batch["loss_mask"][b, k][None], batch["segment_ids"][b, k][None]))[0]
      # bos + the prompt's tokens: input positions 0 .. len(prompt), and nothing else.
      want = np.zeros(16)
      want[:1 + len(prompt)] = 1.0
      np.testing.assert_array_equal(pos, want)
      np.testing.assert_array_equal(batch["inputs"][b, k][pos > 0], [TOK.bos_id] + TOK.encode(prompt))


def test_prompt_positions_per_segment_of_a_packed_row():
  # Two packed sequences: prompt 2 inputs + 2 loss positions + eos input, then prompt 3 + 1 loss + eos.
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])
  mask = np.array([[0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(prompt_positions(mask, seg))[0],
                                [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0])


def test_prompt_embedding_ignores_the_responses_and_is_the_direct_mean():
  model, params = _tiny_model()
  batch = _pref_batch([("ab", "xy", "y"), ("abcd", "xz", "yyy")])
  out = losses.model_outputs(model, params, batch, frozenset({"embeddings", "last_hidden"}))
  # Change every response token (and the eos after it): the prompt embedding must not move.
  other = _pref_batch([("ab", "qq", "rrr"), ("abcd", "q", "r")])
  out2 = losses.model_outputs(model, params, other, frozenset({"embeddings", "last_hidden"}))
  np.testing.assert_array_equal(out["prompt_embeddings"], out2["prompt_embeddings"])
  np.testing.assert_array_equal(out["prompt_last_embeddings"], out2["prompt_last_embeddings"])
  assert not np.allclose(out["embeddings"], out2["embeddings"])
  # Direct mean of the hidden states over bos + prompt, from a forward pass over the prompt alone.
  for b, prompt in enumerate(("ab", "abcd")):
    ids = np.asarray([[TOK.bos_id] + TOK.encode(prompt)])
    _, hidden = model.apply(params, ids, return_hidden=True)
    for k in range(2):
      np.testing.assert_allclose(out["prompt_embeddings"][b, k], np.asarray(hidden[0]).mean(0), rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(out["prompt_last_embeddings"][b, k], np.asarray(hidden[0, -1]), rtol=1e-5,
                                 atol=1e-6)
  # The last-token embedding is the eos input's state: it has seen prompt and response.
  row = batch["inputs"][0, 0][batch["segment_ids"][0, 0] > 0]
  _, hidden = model.apply(params, row[None], return_hidden=True)
  np.testing.assert_allclose(out["last_embeddings"][0, 0], np.asarray(hidden[0, -1]), rtol=1e-5, atol=1e-6)
