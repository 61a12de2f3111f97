r"""The dry run of a recipe: validate it, build every shape abstractly, compile the train step for its mesh,
and report what the run would need, without loading a weight or reading a record.

    python main.py --config=configs/paper/owlore.py --workdir=/tmp/dry --config.dry_run=True
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python main.py --config=configs/paper/galore_c4.py:size=1b --workdir=/tmp/dry --config.dry_run=True

Prints and writes workdir/dry_run.json: parameter count, trainable parameters, optimizer-state bytes, the
compiled step's per-device memory (`compiled.memory_analysis()`) and FLOPs (`compiled.cost_analysis()`),
and the expected step count. On CPU the recipe's mesh is simulated with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`: the compile is the real SPMD partitioning of the
step for N devices, but the memory and FLOPs are XLA:CPU's figures (no fused attention, CPU layouts), an
estimate of an accelerator's, not a measurement.

What is abstract: the model's parameters come from `jax.eval_shape(model.init)` of the recipe's preset (or
the `config.json` of `model.hf_path`, weights never read); the batch has the shapes and dtypes the data
pipeline gives the recipe's data kind; the files of `config.data` need not exist (a missing one is listed
under `data_files_missing`). Two things a dry run cannot compute are replaced by shape-identical stand-ins,
and reported under `stand_ins`: a layer-sampling draw from scores (OwLore's outlier ratios need the
weights and the calibration data) uses a uniform draw of the same gamma blocks; a loss's frozen encoder
is left out.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import data as data_lib
import losses
import models
import optim
import peft
from train_lib import build
from train_lib import evaluate as eval_lib
from train_lib import sharding as shd
from train_lib import train as train_lib
from train_lib import validate as validate_lib
from train_lib.build import TrainState

_PROBE_SEQ = 37      # an odd length no other axis has: its axes are the sequence axes of the batch


# =====================================================================================================
# Pure helpers
# =====================================================================================================
def tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "shape")))


def tree_count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def model_config(config) -> models.DecoderConfig:
  """The recipe's DecoderConfig without weights: `model.hf_path`'s config.json when that exists, else the
  preset `model.name` with `model.overrides` (the preset's own vocabulary, not a tokenizer's)."""
  mc = config.model
  overrides = build._model_overrides(mc)   # pylint: disable=protected-access
  hf = mc.get("hf_path")
  if hf and os.path.exists(os.path.join(hf, "config.json")):
    return build.frozen_model_config(hf).replace(**overrides)
  return models.preset(mc.name, **overrides, **dict(mc.get("overrides", {}) or {}))


def abstract_batch(config) -> dict:
  """ShapeDtypeStructs of one global training batch: the keys and dtypes of the built-in task's batches of
  the recipe's data kind (the same pipeline as file data), at the recipe's batch size and sequence length."""
  dc = data_lib.default_config()
  dc.pref_kind = config.data.get("pref_kind")
  dc.train_size, dc.eval_size = 8, 8     # one probe batch: no need for the task's 50_000 problems
  if dc.pref_kind == "listwise":
    dc.list_size = int(config.data.get("list_size", 4))
  tok = data_lib.get_tokenizer(dc)
  ds = data_lib.get_dataset(dc, "train", tokenizer=tok, batch_size=2, seq_len=_PROBE_SEQ, seed=0)
  probe = eval_lib.to_model_batch(next(iter(ds)))
  B, T = int(config.batch_size), int(config.seq_len)
  out = {}
  for k, v in probe.items():
    shape = tuple(B if i == 0 else (T if d == _PROBE_SEQ else d) for i, d in enumerate(v.shape))
    out[k] = jax.ShapeDtypeStruct(shape, v.dtype)
  return out


def _with_sharding(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def expected_steps(config) -> dict:
  """The step count and what it means in tokens and records (records: when the recipe states its count)."""
  steps = int(config.total_steps)
  rows = steps * int(config.batch_size)
  out = {"total_steps": steps, "rows_seen": rows, "tokens_seen": rows * int(config.seq_len)}
  recipe = config.get("recipe") or {}
  n = recipe.get("train_records")
  if n:
    out["train_records"] = int(n)
    out["epochs"] = round(rows / int(n), 3)
  return out


# =====================================================================================================
# The dry run
# =====================================================================================================
def _dry_config(config):
  """A copy with the stand-ins a dry run needs, and their descriptions."""
  config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  stand_ins = []
  sc = config.get("sampling")
  if sc is not None and sc.get("method") and sc.get("prob_mode", "uniform") not in ("uniform", "increase",
                                                                                      "decrease"):
    stand_ins.append(f"sampling.prob_mode={sc.prob_mode!r} -> 'uniform' (same gamma={sc.gamma} slots; the "
                     f"scores need weights and calibration data)")
    sc.prob_mode = "uniform"
  if losses.get(config.loss.name).frozen_model_path(config.loss):
    stand_ins.append("the loss's frozen encoder is not compiled into the step")
  return config, stand_ins


def _missing_files(config) -> list[str]:
  out = []
  if config.data.get("source", "builtin") == "builtin":
    return out
  for split in ("train", config.get("eval_split", "test")):
    try:
      data_lib.split_files(config.data, split)
    except (ValueError, FileNotFoundError) as e:
      out.append(f"{split}: {e}")
  return out


def dry_run(config, workdir: str | None = None, *, compile_step: bool = True, verbose: bool = True) -> dict:
  """Validates `config`, builds the run abstractly, compiles its train step on `config.mesh` over the
  available devices, and returns (and writes to workdir/dry_run.json) the report."""
  if config.get("task", "train") == "merge":
    return merge_dry_run(config, workdir, verbose=verbose)
  config = build.with_defaults(config)
  validate_lib.validate(config, check_files=False)
  config, stand_ins = _dry_config(config)
  mesh = shd.make_mesh(config.get("mesh"))
  mcfg = model_config(config)
  model = models.Decoder(mcfg)
  key = jax.random.PRNGKey(config.seed)
  base = jax.eval_shape(model.init, key)
  run_hooks = []

  def transformed(p):
    params, hooks_ = build.transform_params(config, model, p)
    run_hooks[:] = [name for name, _ in hooks_]
    return params
  params = jax.eval_shape(transformed, base)
  trainable, frozen = build.split_trainable(params)
  tx, schedule = optim.from_config(config, trainable)
  loss_entry = losses.get(config.loss.name)
  ref_params = None
  if "reference" in loss_entry.needs_for(config.loss) and not peft.has_adapters(params):
    ref_params = base   # full fine-tuning: a frozen copy of the start weights is the reference
  abstract_state = jax.eval_shape(lambda t: build.init_state(tx, t, config.seed), trainable)

  report = {
      "recipe": (config.get("recipe") or {}).get("name", ""),
      "model": {k: getattr(mcfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "num_kv_heads", "intermediate_size", "param_dtype", "dtype",
                                               "remat")},
      "devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
      "mesh": dict(mesh.shape),
      "parameters": tree_count(base),
      "parameters_with_transforms": tree_count(params),
      "trainable_parameters": tree_count(trainable),
      "parameter_bytes": tree_bytes(params),
      "reference_bytes": tree_bytes(ref_params) if ref_params is not None else 0,
      "optimizer_state_bytes": tree_bytes(abstract_state.opt_state),
      "batch": {k: list(v.shape) for k, v in abstract_batch(config).items()},
      **expected_steps(config),
      "host_hooks": run_hooks,
      "stand_ins": stand_ins,
      "data_files_missing": _missing_files(config),
  }
  if compile_step:
    state_sh = TrainState(**shd.tree_shardings(abstract_state._asdict(), mesh))
    frozen_sh = shd.tree_shardings({"params": frozen}, mesh)["params"]
    batch = abstract_batch(config)
    batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) if v.shape else shd.replicated(mesh)
                for k, v in batch.items()}
    args = [_with_sharding(abstract_state, state_sh), _with_sharding(frozen, frozen_sh)]
    args.append(None if ref_params is None else
                _with_sharding(ref_params, shd.tree_shardings({"params": ref_params}, mesh)["params"]))
    args.append(_with_sharding(batch, batch_sh))
    step_fn = jax.jit(
        functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule, loss_entry=loss_entry,
                          loss_cfg=config.loss, grad_accum_steps=int(config.optim.get("grad_accum_steps", 1))),
        donate_argnums=(0,), out_shardings=(state_sh, shd.replicated(mesh)))
    compiled = step_fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    report["per_device_memory"] = None if mem is None else {
        k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes", "temp_size_in_bytes",
                                          "generated_code_size_in_bytes") if hasattr(mem, k)}
    if report["per_device_memory"]:
      m = report["per_device_memory"]
      m["peak_estimate_bytes"] = (m.get("argument_size_in_bytes", 0) + m.get("output_size_in_bytes", 0)
                                  - m.get("alias_size_in_bytes", 0) + m.get("temp_size_in_bytes", 0))
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    report["flops_per_step"] = float((cost or {}).get("flops", float("nan")))
  if verbose:
    print(format_report(report), flush=True)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "dry_run.json"), "w") as f:
      json.dump(report, f, indent=2, default=str)
  return report


def merge_dry_run(config, workdir: str | None = None, *, verbose: bool = True) -> dict:
  """The merge task's dry run: the method and its parameters resolve, the merge traces over abstract trees
  of the preset's shape (`config.model_preset`, `config.num_models` fine-tunes), and the float32 memory of
  a whole-tree merge against a streaming (tensor by tensor) one."""
  import merging   # pylint: disable=g-import-not-at-top
  if config.method not in merging.names():
    raise validate_lib.ConfigError(f"config.method={config.method!r}; valid: {', '.join(merging.names())}")
  params = json.loads(config.params) if isinstance(config.params, str) and config.params.strip() else {}
  mcfg = models.preset(config.get("model_preset", "llama2_7b"), **dict(config.get("model_overrides", {}) or {}))
  base = jax.eval_shape(models.Decoder(mcfg).init, jax.random.PRNGKey(0))
  n = int(config.get("num_models", 2))
  # The merge itself runs on a two-tensor tree of the model's layout (its driver reads dtypes and values on
  # the host, so it does not trace): the method and its parameters resolve and merge.
  rnd = lambda i, *shape: np.asarray(jax.random.normal(jax.random.PRNGKey(i), shape), np.float32)
  t0 = {"embed": {"embedding": rnd(0, 16, 8)}, "layers": {"mlp": {"up_proj": {"kernel": rnd(1, 1, 8, 8)}}}}
  fts = [jax.tree.map(lambda x, i=i: x + 0.01 * rnd(i + 2, *x.shape), t0) for i in range(n)]
  merged = merging.get(config.method)(t0, fts, **params)
  if jax.tree.structure(merged) != jax.tree.structure(t0):
    raise validate_lib.ConfigError(f"merge {config.method}: the merged tree's layout differs from its inputs'")
  # Streaming reads one tensor of each model at a time: a layer's slice of the stacked leaves (HF layout).
  largest = max(math.prod(x.shape[1:]) if peft.path_str(p).startswith("layers") else math.prod(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(base)[0])
  report = {
      "recipe": (config.get("recipe") or {}).get("name", ""), "task": "merge", "method": config.method,
      "params": params, "num_models": n, "parameters": tree_count(base),
      "checked_on": "a two-tensor tree (embedding, stacked kernel) of random fine-tunes",
      "whole_tree_float32_bytes": (n + 2) * tree_count(base) * 4,
      "streaming_float32_bytes_per_tensor": (n + 2) * largest * 4,
  }
  if verbose:
    print(json.dumps(report, indent=2), flush=True)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "dry_run.json"), "w") as f:
      json.dump(report, f, indent=2, default=str)
  return report


def _gib(n) -> str:
  return f"{n / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
  lines = [f"dry run {r['recipe'] or ''}: {r['devices']} {r['platform']} devices, mesh {r['mesh']}",
           f"  parameters          {r['parameters']:,} ({r['trainable_parameters']:,} trainable)",
           f"  parameter bytes     {_gib(r['parameter_bytes'])}"
           + (f" (+ reference {_gib(r['reference_bytes'])})" if r["reference_bytes"] else ""),
           f"  optimizer state     {_gib(r['optimizer_state_bytes'])}",
           f"  steps               {r['total_steps']:,} ({r['tokens_seen']:,} token slots"
           + (f", {r['epochs']} epochs of {r['train_records']:,} records)" if "epochs" in r else ")")]
  m = r.get("per_device_memory")
  if m:
    lines.append(f"  per device (XLA)    args {_gib(m.get('argument_size_in_bytes', 0))}, temp "
                 f"{_gib(m.get('temp_size_in_bytes', 0))}, peak ~{_gib(m['peak_estimate_bytes'])}")
  if "flops_per_step" in r:
    lines.append(f"  FLOPs per step      {r['flops_per_step']:.3e} (per device, as compiled)")
  for s in r["stand_ins"]:
    lines.append(f"  stand-in: {s}")
  for s in r["data_files_missing"]:
    lines.append(f"  data file missing: {s}")
  return "\n".join(lines)
