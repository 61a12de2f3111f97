"""The merge task (train_lib/merge.py, configs/merge.py) and the SALSA soup reference (build.reference_soup).

Tiny random models written as HF directories, a project workdir (a smoke SFT run) and HF PEFT adapter
directories go through `train_lib.run_task`; the HF directory it writes is read back with `models.load_hf`
and compared with the in-memory `merging` call on the same trees.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
import models
import peft
import train_lib
from configs import merge as merge_config
from train_lib import build
from train_lib import merge as merge_lib


def _tree(seed, base=None, vocab=256, scale=0.01):
  """A tiny decoder's params: random init (seed), or base + N(0, scale) (numpy, float32)."""
  cfg = models.DecoderConfig.tiny(vocab_size=vocab)
  if base is None:
    return cfg, jax.device_get(models.Decoder(cfg).init(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  return cfg, jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(x.dtype),
                           base)


def _save(path, cfg, params):
  models.save_hf(str(path), cfg, params)
  return str(path)


def _close(a, b, rtol=1e-6, atol=1e-6):
  fa, fb = merging.flatten(a), merging.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), rtol=rtol,
                               atol=atol, err_msg=k)


def _run(out, **kw):
  c = merge_config.get_config()
  for k, v in kw.items():
    if isinstance(v, dict) and k != "params":
      c[k].update(v)
    else:
      c[k] = json.dumps(v) if k == "params" and not isinstance(v, str) else v
  train_lib.run_task(c, str(out))
  with open(os.path.join(out, "merge.json")) as f:
    return models.load_hf(str(out))[1], json.load(f)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  cfg, base = _tree(0)
  _, ft1 = _tree(1, base)
  _, ft2 = _tree(2, base)
  dirs = [_save(d / n, cfg, t) for n, t in (("base", base), ("ft1", ft1), ("ft2", ft2))]
  with open(os.path.join(dirs[0], "tokenizer.json"), "w") as f:
    f.write('{"marker": "the base tokenizer"}')
  return dirs, (base, ft1, ft2)


def test_hf_dirs_stream_and_equal_the_in_memory_merge(hf_dirs, tmp_path):
  (b, m1, m2), (base, ft1, ft2) = hf_dirs
  params = {"density": {"layers/attn/.*": 0.7, ".*": 0.4}, "weight": [1.0, 0.5]}
  want = merging.ties(base, [ft1, ft2], **params)
  got, rec = _run(tmp_path / "stream", method="ties", base=b, models=f"{m1},{m2}", params=params)
  assert rec["streaming"]
  _close(got, want)
  with open(tmp_path / "stream" / "tokenizer.json") as f:
    assert "the base tokenizer" in f.read()
  got2, rec2 = _run(tmp_path / "mem", method="ties", base=b, models=f"{m1},{m2}", params=params, streaming=False)
  assert not rec2["streaming"]
  _close(got2, want)


def test_merging_a_model_with_itself_returns_it(hf_dirs, tmp_path):
  (b, m1, _), (_, ft1, _) = hf_dirs
  got, _ = _run(tmp_path / "self", method="linear", models=f"{m1},{m1}")
  _close(got, ft1, rtol=0, atol=0)


def _adapters(base, d, n=2):
  """n random LoRA (rank 4, all linear layers, nonzero B) adapters on `base`, exported as HF PEFT
  directories: [(directory, adapted params)]."""
  out = []
  for i in range(n):
    lcfg = peft.default_config()
    lcfg.method, lcfg.rank, lcfg.alpha, lcfg.targets = "lora", 4, 8.0, "all-linear"
    p = peft.apply_config(base, lcfg, rng=jax.random.PRNGKey(10 + i))
    rng = np.random.default_rng(i)
    p = peft.map_with_path(lambda path, l: l.replace(b=jnp.asarray(0.05 * rng.standard_normal(l.b.shape),
                                                                   l.b.dtype)) if isinstance(l, peft.LoRA) else l,
                           p, is_leaf=peft.is_adapter)
    path = str(d / f"adapter{i}")
    peft.export_adapter(path, p, lcfg)
    out.append((path, p))
  return out


@pytest.fixture(scope="module")
def adapter_dirs(hf_dirs, tmp_path_factory):
  return _adapters(hf_dirs[1][0], tmp_path_factory.mktemp("adapters"))


def test_hf_dir_and_adapter_dir_inputs(hf_dirs, adapter_dirs, tmp_path):
  (b, m1, _), (base, ft1, _) = hf_dirs
  (ad0, p0), _ = adapter_dirs
  got, rec = _run(tmp_path / "ta", method="task_arithmetic", base=b, models=f"{m1},{ad0}",
                  params={"weight": [0.5, 1.0]})
  assert rec["kinds"] == ["hf", "adapter"] and not rec["streaming"]
  _close(got, merging.task_arithmetic(base, [ft1, peft.merge(p0)], weight=[0.5, 1.0]), rtol=1e-5, atol=1e-6)


def test_lora_native_cat_is_the_sum_of_the_deltas(hf_dirs, adapter_dirs, tmp_path):
  (b, _, _), (base, _, _) = hf_dirs
  (ad0, p0), (ad1, p1) = adapter_dirs
  got, rec = _run(tmp_path / "cat", method="lora_cat", base=b, models=f"{ad0},{ad1}")
  fb, f0, f1 = (merging.flatten(peft.merge(t)) for t in (base, p0, p1))
  want = {k: fb[k] + (f0[k] - fb[k]) + (f1[k] - fb[k]) for k in fb}
  _close(got, merging.unflatten(want), rtol=1e-5, atol=1e-6)
  assert rec["kinds"] == ["adapter", "adapter"]


@pytest.mark.slow
def test_workdir_and_adapter_dir_inputs(tmp_path):
  """A project workdir (a 4-step smoke SFT run) and an adapter directory merged on an HF base of its shapes."""
  from configs import sft  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "sft")
  c = sft.get_config("model=tiny,smoke")
  c.eval_before, c.eval.num_examples, c.total_steps = False, 0, 4
  train_lib.train_and_evaluate(c, work)
  _, model, trained, _ = build.load_trained(work)
  trained = jax.device_get(peft.merge(trained))
  base = jax.device_get(model.init(jax.random.PRNGKey(7)))
  base_dir = _save(tmp_path / "base", model.config, base)
  ((ad0, p0),) = _adapters(base, tmp_path, n=1)
  got, rec = _run(tmp_path / "ta", method="task_arithmetic", base=base_dir, models=f"{work},{ad0}",
                  params={"weight": [0.5, 1.0]})
  assert rec["kinds"] == ["workdir", "adapter"] and not rec["streaming"]
  want = merging.task_arithmetic(base, [trained, peft.merge(p0)], weight=[0.5, 1.0])
  _close(got, want, rtol=1e-5, atol=1e-6)


_YAML = """\
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {m1}
    parameters:
      weight: 1.0
      density:
        - filter: self_attn
          value: 0.7
        - value: 0.4
  - model: {m2}
    parameters:
      weight: 0.5
      density: 0.5
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""


@pytest.mark.parametrize("streaming", [True, False])
def test_mergekit_yaml_equals_the_equivalent_config(hf_dirs, tmp_path, streaming):
  (b, m1, m2), _ = hf_dirs
  yml = tmp_path / "merge.yml"
  yml.write_text(_YAML.format(base=b, m1=m1, m2=m2))
  got, rec = _run(tmp_path / "yaml", mergekit_yaml=str(yml), streaming=streaming)
  assert rec["method"] == "ties" and rec["models"] == [m1, m2]
  params = {"weight": [1.0, 0.5], "density": [{"layers/attn/.*": 0.7, ".*": 0.4}, 0.5], "normalize": True}
  want, _ = _run(tmp_path / "cfg", method="ties", base=b, models=f"{m1},{m2}", params=params)
  _close(got, want, rtol=0, atol=0)


def test_mergekit_filters_become_regexes_over_our_paths():
  paths = ["embed/embedding", "layers/attn/q_proj/kernel", "layers/attn_norm/scale", "layers/mlp/up_proj/kernel",
           "final_norm/scale", "lm_head/kernel"]
  rules = merge_lib.from_mergekit_setting([{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.2},
                                           {"value": 0.1}], paths, "density")
  got = {p: merging.resolve(rules, p) for p in paths}
  assert got == {"embed/embedding": 0.1, "layers/attn/q_proj/kernel": 0.5, "layers/attn_norm/scale": 0.1,
                 "layers/mlp/up_proj/kernel": 0.2, "final_norm/scale": 0.1, "lm_head/kernel": 0.1}
  norms = merge_lib.from_mergekit_setting([{"filter": "layernorm", "value": 0.0}, {"value": 1.0}], paths, "t")
  assert merging.resolve(norms, "layers/attn_norm/scale") == 0.0 and merging.resolve(norms, "final_norm/scale") == 1.0
  assert merge_lib.our_path("model.layers.3.self_attn.v_proj.weight") == "layers/attn/v_proj/kernel"


def test_different_vocab_sizes_are_refused_or_rectified(hf_dirs, tmp_path):
  (b, m1, _), (base, ft1, _) = hf_dirs
  cfg, big = _tree(3, vocab=260)
  big = jax.tree.map(np.asarray, big)
  big["layers"] = ft1["layers"]
  big_dir = _save(tmp_path / "big", cfg, big)
  with pytest.raises(ValueError, match=r"256.*260|260.*256"):
    _run(tmp_path / "refused", method="ties", base=b, models=f"{m1},{big_dir}", params={"density": 0.5})
  got, _ = _run(tmp_path / "rect", method="ties", base=b, models=f"{m1},{big_dir}", params={"density": 0.5},
                rectify_embed=True)
  cut = dict(big, embed={"embedding": big["embed"]["embedding"][:256]})
  if "lm_head" in big:
    cut["lm_head"] = {"kernel": big["lm_head"]["kernel"][:, :256]}
  _close(got, merging.ties(base, [ft1, cut], density=0.5))
  assert np.shape(got["embed"]["embedding"])[0] == 256


@pytest.mark.slow
def test_dpo_with_a_soup_reference_of_two_sft_runs(tmp_path):
  """SALSA: the reference is the uniform average of two SFT runs; the DPO run trains, and its held-out
  metrics before training (policy = run 1, reference = the soup) equal those computed with the average of
  the two runs' parameters taken by hand."""
  from configs import dpo, sft  # pylint: disable=g-import-not-at-top
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import losses  # pylint: disable=g-import-not-at-top
  from train_lib import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from train_lib import sharding as shd  # pylint: disable=g-import-not-at-top
  from train_lib import train as train_mod  # pylint: disable=g-import-not-at-top
  runs = []
  for seed in (0, 1):
    c = sft.get_config("model=tiny,smoke")
    c.seed = seed
    c.eval_before, c.eval.num_examples, c.total_steps = False, 0, 4
    train_lib.train_and_evaluate(c, str(tmp_path / f"sft{seed}"))
    runs.append(str(tmp_path / f"sft{seed}"))
  cfg = dpo.get_config("model=tiny,smoke")
  cfg.model.init_workdir = runs[0]
  cfg.reference.soup = ",".join(runs)
  summary = train_lib.train_and_evaluate(cfg, str(tmp_path / "dpo"))
  assert summary["steps"] == cfg.total_steps and np.isfinite(summary["after"]["loss"])

  p0, p1 = (jax.device_get(peft.merge(build.load_trained(r)[2])) for r in runs)
  avg = jax.tree.map(lambda a, b: (np.asarray(a, np.float32) + np.asarray(b, np.float32)) / 2, p0, p1)
  _close(build.reference_soup(cfg.reference.soup), avg, rtol=1e-6, atol=1e-7)

  config = build.with_defaults(cfg)
  mesh = shd.make_mesh(config.get("mesh"))
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = build.build_model(config, tokenizer)
  params, _ = build.transform_params(config, model, params)
  trainable, frozen = build.split_trainable(params)
  entry = losses.get(config.loss.name)
  step = jax.jit(functools.partial(train_mod.eval_step, model=model, loss_entry=entry, loss_cfg=config.loss))
  by_hand = eval_lib.heldout_loss(config, tokenizer, functools.partial(step, trainable, frozen, avg), mesh)
  start = eval_lib.heldout_loss(config, tokenizer, functools.partial(step, trainable, frozen, p0), mesh)
  before = summary["before"]
  for k, v in by_hand.items():
    np.testing.assert_allclose(before[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  reward_keys = [k for k in by_hand if "reward" in k and "accurac" not in k]
  assert reward_keys and any(abs(start[k] - by_hand[k]) > 1e-4 for k in reward_keys)   # the reference matters


@pytest.mark.parity
def test_mergekit_yaml_equals_mergekit_itself(hf_dirs, tmp_path):
  """The same YAML run by mergekit 0.1.5 (`run_merge`, reference environment) and by the merge task."""
  from tests import refenv  # pylint: disable=g-import-not-at-top
  refenv.require()
  (b, m1, m2), _ = hf_dirs
  yml = tmp_path / "merge.yml"
  yml.write_text(_YAML.format(base=b, m1=m1, m2=m2))
  refenv.run("mergekit_yaml", yaml=str(yml), out_dir=str(tmp_path / "mergekit"))
  want = models.load_hf(str(tmp_path / "mergekit"))[1]
  got, _ = _run(tmp_path / "ours", mergekit_yaml=str(yml))
  _close(got, want, rtol=1e-5, atol=2e-7)
  base = models.load_hf(b)[1]
  moved = merging.flatten(jax.tree.map(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).max(), want, base))
  assert max(moved.values()) > 1e-3          # the merge changed the weights (not base == base)


def test_fisher_merge_task_estimates_each_models_fisher_on_the_calibration_data(hf_dirs, tmp_path):
  """method=fisher from the command line: each model's diagonal Fisher on the same calibration batches
  (labels sampled from the model, model i with key fold_in(seed key, i)), then the Fisher-weighted mean."""
  import data  # pylint: disable=g-import-not-at-top
  (_, m1, m2), (_, ft1, ft2) = hf_dirs
  got, rec = _run(tmp_path / "fisher", method="fisher", models=f"{m1},{m2}",
                  calibration={"num_batches": 2, "batch_size": 2, "seq_len": 32})
  assert not rec["streaming"]
  cfg = models.DecoderConfig.tiny(vocab_size=256)
  model = models.Decoder(cfg)
  dcfg = merge_config.get_config().data
  it = iter(data.get_dataset(dcfg, "train", tokenizer=data.get_tokenizer(dcfg), batch_size=2, seq_len=32, seed=0))
  batches = [{k: jnp.asarray(b[k]) for k in ("inputs", "positions", "segment_ids", "loss_mask")}
             for b in (next(it), next(it))]

  def log_prob(params, batch, rng):          # written out here: log p of labels the model samples itself
    logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    y = jax.random.categorical(rng, logits.astype(jnp.float32))
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return (jnp.take_along_axis(lp, y[..., None], -1)[..., 0] * batch["loss_mask"]).sum(-1)

  fishers = [merging.fisher_diagonal(log_prob, jax.tree.map(jnp.asarray, t), batches,
                                     jax.random.fold_in(jax.random.PRNGKey(0), i)) for i, t in enumerate((ft1, ft2))]
  want = merging.fisher(None, [ft1, ft2], fisher=fishers)
  _close(got, want, rtol=1e-5, atol=1e-6)
  avg = merging.linear(None, [ft1, ft2])
  diff = merging.flatten(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), got, avg))
  assert max(diff.values()) > 1e-4            # precision weighting is not the plain average
