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


# ------------------------------------------------------------------------------------------------
# Mahalanobis with a given or learned Sigma^-1.
# ------------------------------------------------------------------------------------------------
D, B = 4, 5


def _loss(pol, ref, batch=None, **cfg):
  return losses.get("dpo_kernels").fn(pol, ref, batch or {}, ml_collections.ConfigDict(cfg))


def _outputs(seed, vocab=7):
  rng = np.random.default_rng(seed)
  return {"logps": rng.normal(size=(B, 2)) * 3 - 12,
          "embeddings": rng.normal(size=(B, 2, D)) * 0.7,
          "prompt_embeddings": np.repeat(rng.normal(size=(B, 1, D)) * 0.7, 2, axis=1),
          "last_logits": rng.normal(size=(B, 2, vocab)) * 2}


def test_precision_from_embeddings_is_the_inverse_shrunk_covariance():
  e = np.random.default_rng(0).normal(size=(50, D)) @ np.diag([3.0, 1.0, 0.5, 0.1])
  for s in (0.0, 0.3):
    p = kr.mahalanobis_precision_from_embeddings(e, shrinkage=s)
    c = np.cov(e.T)
    sigma = (1 - s) * c + s * np.trace(c) / D * np.eye(D)
    np.testing.assert_allclose(p @ sigma, np.eye(D), atol=1e-10)
  assert np.linalg.eigvalsh(kr.mahalanobis_precision_from_embeddings(e[:3], 0.1)).min() > 0   # N < D
  with pytest.raises(ValueError, match="shrinkage"):
    kr.mahalanobis_precision_from_embeddings(e, 1.5)


def test_mahalanobis_with_a_given_sigma_inverse_equals_its_formula_and_differs_from_rbf(tmp_path):
  pol, ref = _outputs(1), _outputs(2)
  emb = np.random.default_rng(3).normal(size=(40, D)) @ np.diag([2.0, 1.0, 0.3, 0.1])
  precision = kr.mahalanobis_precision_from_embeddings(emb, shrinkage=0.1)
  path = str(tmp_path / "sigma_inv.npy")
  np.save(path, precision)
  cfg = dict(mode="faithful", kernel="mahalanobis", kernel_scale=1.0, divergence_scale=0.0)
  with jax.enable_x64(True):
    maha, _ = _loss(pol, ref, maha_sigma_inv=path, **cfg)
    rbf, _ = _loss(pol, ref, **{**cfg, "kernel": "rbf", "rbf_sigma": 1.0})
    ident, _ = _loss(pol, ref, **cfg)
  x, yc, yr = pol["prompt_embeddings"][:, 0], pol["embeddings"][:, 0], pol["embeddings"][:, 1]
  log_k = lambda a, b: -np.einsum("bi,ij,bj->b", a - b, precision, a - b) / 2.0   # log exp(-d^T S d / 2)
  want = np.mean(-((pol["logps"][:, 0] - pol["logps"][:, 1]) + log_k(x, yc) - log_k(x, yr)))
  assert float(maha) == pytest.approx(want, rel=1e-12)
  assert abs(float(maha) - float(rbf)) > 1e-3
  assert float(ident) == pytest.approx(float(rbf), rel=1e-5)      # the identity is RBF with sigma = 1
  with pytest.raises(ValueError, match="dimension"):
    np.save(path.replace("sigma_inv", "wrong"), np.eye(D + 1))
    _loss(pol, ref, maha_sigma_inv=path.replace("sigma_inv", "wrong"), **cfg)


def test_learned_mahalanobis_trains_a_cholesky_factor_through_loss_params():
  entry = losses.get("dpo_kernels")
  cfg = ml_collections.ConfigDict(dict(kernel="mahalanobis", maha_sigma_inv="learned", maha_eps=1e-3,
                                       mode="faithful", divergence_scale=0.0))
  params = entry.init_params(cfg, D, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(params["maha_chol"], np.eye(D))
  assert entry.init_params(ml_collections.ConfigDict(dict(kernel="mahalanobis")), D, None) is None
  pol, ref = _outputs(4), _outputs(5)
  L = np.tril(np.random.default_rng(6).normal(size=(D, D)))
  with jax.enable_x64(True):
    got, _ = entry.fn(pol, ref, {"hmk_params": {"maha_chol": jnp.asarray(L)}}, cfg)
    grad = jax.grad(lambda p: entry.fn(jax.tree.map(jnp.asarray, pol), ref, {"hmk_params": p}, cfg)[0])(
        {"maha_chol": jnp.asarray(L)})
  s = L @ L.T + 1e-3 * np.eye(D)
  x, yc, yr = pol["prompt_embeddings"][:, 0], pol["embeddings"][:, 0], pol["embeddings"][:, 1]
  log_k = lambda a, b: -np.einsum("bi,ij,bj->b", a - b, s, a - b) / 2.0
  want = np.mean(-((pol["logps"][:, 0] - pol["logps"][:, 1]) + log_k(x, yc) - log_k(x, yr)))
  assert float(got) == pytest.approx(want, rel=1e-12)
  assert float(jnp.abs(jnp.tril(grad["maha_chol"])).sum()) > 0


# ------------------------------------------------------------------------------------------------
# Wasserstein with the token-embedding ground cost against exact OT.
# ------------------------------------------------------------------------------------------------
def _exact_ot(a, b, cost):
  """min <T, C> over T >= 0 with row sums a and column sums b: the transport LP, solved exactly."""
  from scipy.optimize import linprog
  n, m = cost.shape
  rows = np.kron(np.eye(n), np.ones((1, m)))
  cols = np.kron(np.ones((1, n)), np.eye(m))
  res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None),
                method="highs")
  assert res.status == 0
  return res.fun


@pytest.mark.parametrize("k", [2, 3, 5])
def test_wasserstein_with_embedding_cost_equals_exact_ot(k):
  vocab, eps = 9, 1e-3
  rng = np.random.default_rng(k)
  pol, ref = _outputs(10 + k, vocab), _outputs(20 + k, vocab)
  table = rng.normal(size=(vocab, 3))
  pol["token_embeddings"] = table
  cfg = ml_collections.ConfigDict(dict(divergence="wasserstein", wasserstein_k=k, wasserstein_epsilon=eps,
                                       wasserstein_iters=4000))
  with jax.enable_x64(True):
    got = np.asarray(dk.divergence_term(cfg, jax.tree.map(jnp.asarray, pol), jax.tree.map(jnp.asarray, ref), {}))
    tv = np.asarray(dk.divergence_term(ml_collections.ConfigDict({**cfg, "wasserstein_cost": "discrete"}),
                                       jax.tree.map(jnp.asarray, pol), jax.tree.map(jnp.asarray, ref), {}))
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = softmax(pol["last_logits"][:, 0]), softmax(ref["last_logits"][:, 0])
  for i in range(B):
    support = np.argsort(-np.maximum(p[i], q[i]))[:k]
    a, b = p[i, support] / p[i, support].sum(), q[i, support] / q[i, support].sum()
    cost = np.linalg.norm(table[support][:, None] - table[support][None], axis=-1)
    want = _exact_ot(a, b, cost)
    # The entropic plan's cost exceeds the exact one by at most eps_abs * log(k^2) (its entropy gap).
    assert abs(got[i] - want) <= eps * cost.max() * np.log(k * k) + 1e-9, (i, got[i], want)
    assert abs(tv[i] - 0.5 * np.abs(a - b).sum()) < 1e-2
  assert not np.allclose(got, tv, atol=1e-3)      # the ground cost is really used


def test_wasserstein_reads_the_model_input_embeddings_through_a_declared_need():
  cfg = ml_collections.ConfigDict(dict(divergence="wasserstein", divergence_scale=0.1))
  entry = losses.get("dpo_kernels")
  assert "token_embeddings" in entry.needs_for(cfg)
  assert "token_embeddings" not in entry.needs_for(ml_collections.ConfigDict({**cfg, "wasserstein_cost": "discrete"}))
  assert "token_embeddings" not in entry.needs_for(ml_collections.ConfigDict(dict(divergence="kl")))
  model, params = _tiny_model()
  batch = _pref_batch([("ab", "xy", "y")])
  out = losses.model_outputs(model, params, batch, entry.needs_for(cfg))
  np.testing.assert_array_equal(out["token_embeddings"], params["embed"]["embedding"])
  loss, metrics = entry.fn(out, out, batch, cfg)
  assert np.isfinite(float(loss)) and float(metrics["divergence"]) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Objective modes and the reference model.
# ------------------------------------------------------------------------------------------------
def test_faithful_objective_equals_a_direct_float64_evaluation():
  """kappa (logpi(y_c) - logpi(y_r) + log K(e_x, e_c)/K(e_x, e_r)) - alpha KL at the last chosen token,
  written here in numpy from the reference code's definitions; the reference's log-probs play no part."""
  pol, ref = _outputs(30), _outputs(31)
  kappa, alpha, sigma = 1.7, 0.3, 0.8
  cfg = dict(mode="faithful", kernel="rbf", rbf_sigma=sigma, divergence="kl", kernel_scale=kappa,
             divergence_scale=alpha, beta=123.0, gamma=55.0)
  with jax.enable_x64(True):
    got, _ = _loss(pol, ref, **cfg)
    shifted, _ = _loss(pol, {**ref, "logps": ref["logps"] + np.random.default_rng(0).normal(size=(B, 2))}, **cfg)
  x, yc, yr = pol["prompt_embeddings"][:, 0], pol["embeddings"][:, 0], pol["embeddings"][:, 1]
  k = lambda a, b: np.exp(-((a - b) ** 2).sum(-1) / (2 * sigma ** 2))
  logsm = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp, lq = logsm(pol["last_logits"][:, 0]), logsm(ref["last_logits"][:, 0])
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  hybrid = kappa * ((pol["logps"][:, 0] - pol["logps"][:, 1]) + np.log(k(x, yc) / k(x, yr)))
  want = np.mean(-(hybrid - alpha * kl))
  assert float(got) == pytest.approx(want, rel=1e-12)
  assert float(shifted) == float(got)        # the reference's log-probs do not enter (beta, gamma unused)


def test_precomputed_reference_logps_fail_clearly_for_the_divergence_and_work_without_it():
  pol = _outputs(32)
  ref = {"logps": _outputs(33)["logps"]}       # what the trainer passes with `ref_logps` in the batch
  with pytest.raises(ValueError, match="divergence_scale=0"):
    _loss(pol, ref, divergence_scale=0.1)
  with pytest.raises(ValueError, match="ref_logps_field"):
    _loss(pol, ref, divergence_scale=0.0, embedding_source="reference_hidden")
  loss, _ = _loss(pol, ref, divergence_scale=0.0)
  assert np.isfinite(float(loss))


def test_batch_source_reads_precomputed_embeddings_and_names_what_is_missing():
  pol, ref = _outputs(34), _outputs(35)
  rng = np.random.default_rng(36)
  e = {k: rng.normal(size=(B, D)) for k in ("e_x", "e_c", "e_r")}
  cfg = dict(mode="faithful", kernel="rbf", divergence_scale=0.0, embedding_source="batch")
  with jax.enable_x64(True):
    got, m = _loss(pol, ref, e, **cfg)
  want = -(((e["e_x"] - e["e_c"]) ** 2).sum(-1) - ((e["e_x"] - e["e_r"]) ** 2).sum(-1)) / 2.0
  assert float(m["kernel/log_ratio"]) == pytest.approx(want.mean(), rel=1e-12)
  with pytest.raises(ValueError, match="e_x"):
    _loss(pol, ref, {}, **cfg)


# ------------------------------------------------------------------------------------------------
# The frozen encoder (the paper's embedding source), beside the policy's own hidden states.
# ------------------------------------------------------------------------------------------------
def test_frozen_encoder_outputs_reach_the_loss_through_the_trainer_step():
  import peft
  from train_lib import train as train_mod
  policy, params = _tiny_model(0)
  encoder, enc_params = _tiny_model(1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48)
  entry = losses.get("dpo_kernels")
  cfg = ml_collections.ConfigDict(dict(mode="faithful", kernel="rbf", rbf_sigma=2.0, divergence="kl",
                                       divergence_scale=0.0, embedding_source="frozen_encoder",
                                       embedding_pool="last", encoder_path="unused-here"))
  assert "embeddings" not in entry.needs_for(cfg) and "last_hidden" not in entry.needs_for(cfg)
  batch = _pref_batch([("ab", "xy", "y"), ("abcd", "xz", "yyy")])
  trainable, frozen = peft.split(params)
  step = lambda enc_p, p_trainable: train_mod.loss_and_metrics(
      p_trainable, frozen, params, batch, None, enc_p, model=policy, loss_entry=entry, loss_cfg=cfg,
      frozen_model=encoder)
  _, metrics = step(enc_params, trainable)
  # Direct: the encoder's state at the last prompt token (e_x) and at each response's eos input (e_y).
  want = []
  for b in range(2):
    rows = [batch["inputs"][b, k][batch["segment_ids"][b, k] > 0] for k in range(2)]
    n_prompt = int(np.argmax(batch["loss_mask"][b, 0] > 0))
    h = [np.asarray(encoder.apply(enc_params, r[None], return_hidden=True)[1][0]) for r in rows]
    e_x, e_c, e_r = h[0][n_prompt], h[0][-1], h[1][-1]
    want.append(-(((e_x - e_c) ** 2).sum() - ((e_x - e_r) ** 2).sum()) / (2 * 2.0 ** 2))
  assert float(metrics["kernel/log_ratio"]) == pytest.approx(np.mean(want), rel=1e-4)
  # Frozen: the encoder gets no gradient through the loss.
  g = jax.grad(lambda e: step(e, trainable)[0])(enc_params)
  assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(g))
  with pytest.raises(ValueError, match="encoder_path"):
    entry.frozen_model_path(ml_collections.ConfigDict(dict(embedding_source="frozen_encoder", encoder_path="")))


@pytest.mark.slow
def test_frozen_encoder_end_to_end_from_an_hf_checkpoint(tmp_path):
  """A tiny decoder written as an HF checkpoint is the frozen embedder of a DPO-Kernels run (HMK, whose
  parameters take the encoder's width; Wasserstein on the input-embedding ground cost)."""
  import train_lib
  from configs import dpo_kernels
  from train_lib import build
  enc_cfg = models.DecoderConfig.tiny(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=48)
  enc = models.Decoder(enc_cfg)
  models.save_hf(str(tmp_path / "encoder"), enc_cfg, enc.init(jax.random.PRNGKey(7)))
  config = dpo_kernels.get_config("model=tiny,smoke,mode=faithful,source=frozen_encoder,pool=last,kernel=hmk,"
                                  "divergence=wasserstein")
  config.loss.encoder_path = str(tmp_path / "encoder")
  config.total_steps = 3
  config.eval_before = False
  config.eval.num_examples = 0
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["after"]["loss"])
  assert summary["state"].params[build.LOSS_PARAMS]["maha_chol"].shape == (32, 32)


# ------------------------------------------------------------------------------------------------
# Embeddings precomputed into the data (embedding_source="batch").
# ------------------------------------------------------------------------------------------------
def _write_records(path, n, dim, seed=0):
  import json
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      a, b = (str(v) for v in rng.integers(10, 99, size=2))
      f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(int(a) + int(b)), "rejected": str(int(a) - 1),
                          **{k: rng.normal(size=dim).tolist() for k in ("e_x", "e_c", "e_r")}}) + "\n")


def test_precomputed_embedding_fields_reach_the_batch(tmp_path):
  import json
  _write_records(tmp_path / "train.jsonl", 3, 6)
  cfg = data.default_config()
  cfg.update({"pref_kind": "pairwise", "tokenizer": "char", "source": "jsonl",
              "path": str(tmp_path / "{split}.jsonl"), "embeddings_field": "e_x,e_c,e_r"})
  batch = next(iter(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=3, seq_len=16, seed=0, train=False)))
  recs = [json.loads(l) for l in open(tmp_path / "train.jsonl")]
  for key in ("e_x", "e_c", "e_r"):
    np.testing.assert_allclose(batch[key], np.asarray([r[key] for r in recs], np.float32))
  bad = dict(recs[0], e_r=recs[0]["e_r"][:-1])
  with pytest.raises(data.DataError, match="different lengths"):
    data.record_preference(bad, "pairwise", data._preference.Fields(embeddings="e_x,e_c,e_r"))
  cfg.pref_kind = "listwise"
  with pytest.raises(ValueError, match="embeddings_field"):
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=3, seq_len=16)


@pytest.mark.slow
def test_batch_source_end_to_end_from_a_jsonl_file(tmp_path):
  import train_lib
  from configs import dpo_kernels
  for split, n in (("train", 16), ("test", 4)):
    _write_records(tmp_path / f"{split}.jsonl", n, 6, seed=len(split))
  config = dpo_kernels.get_config("model=tiny,smoke,mode=faithful,source=batch,kernel=mahalanobis")
  config.data.update({"source": "jsonl", "path": str(tmp_path / "{split}.jsonl"), "tokenizer": "char",
                      "embeddings_field": "e_x,e_c,e_r"})
  config.loss.maha_sigma_inv = "learned"
  config.loss.embedding_dim = 6
  config.total_steps = 3
  config.eval_before = False
  config.eval.num_examples = 0
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["after"]["loss"])
  assert summary["state"].params["loss_params"]["maha_chol"].shape == (6, 6)


def test_wrong_options_fail_before_any_compile():
  from configs import dpo_kernels
  from train_lib import validate
  for key, value, match in (("embedding_source", "cls", "valid: policy_hidden"), ("embedding_pool", "max", "mean"),
                            ("mode", "paper", "faithful"), ("wasserstein_cost", "l2", "discrete"),
                            ("maha_sigma_inv", "diag", "npy"), ("embedding_source", "frozen_encoder", "encoder_path")):
    config = dpo_kernels.get_config("model=tiny,smoke")
    config.loss[key] = value
    with pytest.raises(validate.ConfigError, match=match):
      validate.validate(config)
  validate.validate(dpo_kernels.get_config("model=tiny,smoke,mode=faithful,pool=last"))


def test_precomputed_frozen_encoder_embeddings_equal_the_online_ones(tmp_path):
  """embed.embed_records writes the frozen encoder's embeddings into the records; read back through
  data.embeddings_field (source=batch) they give the kernel term the trainer computes online."""
  import json
  import peft
  from configs import dpo_kernels
  from train_lib import build, embed
  from train_lib import train as train_mod
  enc_cfg = models.DecoderConfig.tiny(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=48)
  models.save_hf(str(tmp_path / "encoder"), enc_cfg, models.Decoder(enc_cfg).init(jax.random.PRNGKey(3)))
  records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
             (("12+3=", "15", "14"), ("7+8=", "15", "16"), ("40+2=", "42", "24"))]
  config = dpo_kernels.get_config("model=tiny,smoke,mode=faithful,source=frozen_encoder,pool=last")
  config.loss.encoder_path = str(tmp_path / "encoder")
  config.loss.divergence_scale = 0.0
  config.seq_len = 16
  config.data.update({"source": "jsonl", "path": str(tmp_path / "{split}.jsonl"), "tokenizer": "char"})
  rows = embed.embed_records(records, config, batch_size=2)
  assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == records
  with open(tmp_path / "train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.embeddings_field = "e_x,e_c,e_r"
  batch = next(iter(data.get_dataset(data_cfg, "train", tokenizer=TOK, batch_size=3, seq_len=16, train=False)))
  policy, params = _tiny_model(0)
  encoder, enc_params = build.frozen_loss_model(config, TOK)
  trainable, frozen = peft.split(params)
  entry = losses.get("dpo_kernels")
  model_batch = {k: batch[k] for k in data.FIELDS}
  _, online = train_mod.loss_and_metrics(trainable, frozen, params, model_batch, None, enc_params, model=policy,
                                         loss_entry=entry, loss_cfg=config.loss, frozen_model=encoder)
  cfg_batch = config.loss.copy_and_resolve_references()
  cfg_batch.embedding_source = "batch"
  _, offline = train_mod.loss_and_metrics(trainable, frozen, params, dict(batch), None, model=policy,
                                          loss_entry=entry, loss_cfg=cfg_batch)
  assert abs(float(online["kernel/log_ratio"])) > 1e-4
  assert float(offline["kernel/log_ratio"]) == pytest.approx(float(online["kernel/log_ratio"]), rel=1e-5)
