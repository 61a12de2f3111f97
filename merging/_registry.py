"""Merge methods by name, and the driver that applies a per-tensor method to whole parameter trees.

    @register_merge("ties", per_model=("weight", "density"))
    def ties(base, models, *, weight, density, key, row_axis, ...):   # arrays of one tensor, float32
      ...
    merged = merging.ties(base_params, [ft1, ft2], density=0.2)     # trees in, tree out
    merged = merging.get("ties")(base_params, [ft1, ft2], density={"embed/.*": 1.0, ".*": 0.2})

Three kinds of method:
  "tensor"  fn(base, models, *, key, row_axis, **params) on one tensor (float32 arrays; base may be None).
            The driver walks the trees, resolves the parameters of each path, splits stacked layers
            (paths matching `stacked`, default `layers/.*`, carry a leading layer axis) so that every
            per-tensor statistic (top-k, norms, cosines) is taken per layer, as on a Hugging Face
            checkpoint, computes in float32 and casts back to the input dtype.
  "model"   fn(base, models, *, seed, **params) on whole flattened models ({path: float32 array}): the
            methods whose statistics span every tensor (PCB, ComPEFT).
  "lora"    fn(loras, **params) on LoRA factors {path: (a [.., in, r], b [.., r, out][, scale])}.

Parameters. A value may be a scalar, a per-model list (for the names in `per_model`), or a dict of
regexes over '/'-joined paths -> value (ordered; the first full match wins; an unmatched path raises),
also inside a per-model list, as mergekit's per-tensor filters. Randomness is deterministic:
`tensor_key(seed, path)` folds a stable hash of the path into `jax.random.key(seed)`; model i of a tensor
uses `fold_in(key, i)`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import peft

STACKED = r"layers/.*"   # paths whose leading axis stacks the decoder layers (models/_decoder.py)
_METHODS: dict[str, "MergeMethod"] = {}
_DRIVER_ARGS = ("key", "row_axis", "seed")
JIT_MIN_SIZE = 1 << 20


# ---------------------------------------------------------------------------------------------------
# Trees, paths, keys, parameters
# ---------------------------------------------------------------------------------------------------
def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {'/'-joined path: leaf} (a flat dict with '/' keys is returned as is)."""
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for p, v in flat.items():
    *parents, leaf = p.split("/")
    node = out
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return out


def path_hash(path: str) -> int:
  """A stable 31-bit hash of a path (CRC-32), the same in every process and Python version."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def tensor_key(seed: int, path: str) -> jax.Array:
  """The PRNG key of one tensor: fold_in(key(seed), crc32(path)); model i then uses fold_in(key, i)."""
  return jax.random.fold_in(jax.random.key(seed), path_hash(path))


def row_axis_of(path: str, ndim: int) -> int:
  """The axis along which a PyTorch weight's row runs. Our kernels are [.., in, out] ('/kernel'), so a
  torch row (one output, all inputs) runs along axis -2; everything else (HF names, norms, embeddings)
  is laid out as in torch and uses -1."""
  return -2 if path.endswith("kernel") and ndim >= 2 else -1


def resolve(value, path: str):
  """A regex dict {pattern: value} -> the value of the first pattern that fully matches `path`."""
  while isinstance(value, Mapping):
    for pattern, v in value.items():
      if re.fullmatch(pattern, path):
        value = v
        break
    else:
      raise KeyError(f"no parameter rule matches {path!r} (rules: {list(value)})")
  return value


def resolve_per_model(value, path: str, n: int) -> list:
  value = resolve(value, path)
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{path}: {len(value)} per-model values for {n} models")
    return [resolve(v, path) for v in value]
  return [value] * n


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """A registered method; calling it merges trees (see the module docstring)."""
  name: str
  fn: Callable
  kind: str = "tensor"                  # "tensor" | "model" | "lora"
  base: str = "required"                # "required" | "optional" | "unused"
  per_model: tuple[str, ...] = ()       # parameters with one value per model
  tensor_params: tuple[str, ...] = ()   # per-model parameter trees sliced like the weights (Fisher)
  jit: bool = True                      # compile the kernel for large tensors (parameters static)
  # How the merge task computes each tensor parameter from a model: name -> fn(log_prob_fn, params,
  # batches, rng) -> tree like params (e.g. the diagonal Fisher from labels sampled by the model).
  estimators: tuple[tuple[str, Callable], ...] = ()

  def estimator(self, name: str) -> Callable:
    found = dict(self.estimators).get(name)
    if found is None:
      raise ValueError(f"{self.name}: no estimator registered for its per-model tensors {name!r}; call "
                       f"merging.{self.name} from Python with them")
    return found

  @property
  def defaults(self) -> dict[str, Any]:
    sig = inspect.signature(self.fn)
    return {k: p.default for k, p in sig.parameters.items()
            if p.kind == p.KEYWORD_ONLY and k not in _DRIVER_ARGS}

  def __call__(self, *args, **params):
    if self.kind == "lora":
      return self.fn(*args, **params)
    base, models = args
    return merge_trees(self, base, models, **params)

  def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(params)
    if "lambda" in params:            # mergekit's name; a Python keyword
      params["lambda_"] = params.pop("lambda")
    defaults = self.defaults
    unknown = set(params) - set(defaults) - {"seed", "stacked"}
    if unknown:
      raise TypeError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in params]
    if missing:
      raise TypeError(f"{self.name}: missing required parameter(s) {missing}")
    return {**defaults, **params}

  def tensor(self, base, models, *, path: str = "", seed: int = 0, **params):
    """Merges one (unstacked) tensor: parameters resolved for `path`, float32 compute, input dtype out."""
    params = self.check_params(params)
    params.pop("stacked", None)
    params.pop("seed", None)
    kw = self._resolved(params, path, len(models))
    ref = base if base is not None else models[0]
    out = self.kernel(base if self.base != "unused" else None, list(models), path=path,
                      key=tensor_key(seed, path), row_axis=row_axis_of(path, np.ndim(ref)), **kw)
    return out.astype(ref.dtype)

  def kernel(self, base, models, *, path: str = "", **kw):
    """fn on float32 copies of the inputs, under jax.jit when `jit` and the tensor has >= JIT_MIN_SIZE
    entries (arrays traced and cast inside, every other parameter static): fusing saves memory and time on
    large tensors, while on small ones compiling a kernel per shape and parameter set costs more than
    running op by op."""
    shapes = {tuple(np.shape(x)) for x in ([base] if base is not None else []) + list(models)}
    if len(shapes) > 1:
      raise ValueError(f"{self.name}: {path or 'a tensor'} has different shapes across the models {sorted(shapes)}; "
                       "resize (e.g. embeddings of other vocabularies) before merging")
    if not self.jit or np.size(models[0]) < JIT_MIN_SIZE:
      kw = {k: [_f32(t) for t in v] if k in self.tensor_params else v for k, v in kw.items()}
      return self.fn(_f32(base), [_f32(x) for x in models], **kw)
    arrays = {k: kw.pop(k) for k in self.tensor_params + ("key",) if k in kw}
    static = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))
    return _jitted(self.fn, static)(base, models, **arrays)

  def _resolved(self, params, path, n):
    kw = {}
    for k, v in params.items():
      if k in self.tensor_params:
        kw[k] = v
      elif k in self.per_model:
        kw[k] = resolve_per_model(v, path, n)
      else:
        kw[k] = resolve(v, path)
    return kw


def _f32(x):
  return None if x is None else jnp.asarray(x, jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  kw = {k: list(v) if isinstance(v, tuple) else v for k, v in static}

  def run(base, models, key=None, **arrays):
    arrays = {k: [_f32(t) for t in v] for k, v in arrays.items()}
    return fn(_f32(base), [_f32(x) for x in models], key=key, **arrays, **kw)
  return jax.jit(run)


def register_merge(name: str, *, kind: str = "tensor", base: str = "required",
                   per_model: tuple[str, ...] = ("weight",), tensor_params: tuple[str, ...] = (),
                   jit: bool = True, estimators: Mapping[str, Callable] | None = None):
  """Decorator: registers `fn` under `name` and returns the callable `MergeMethod`."""
  if kind not in ("tensor", "model", "lora") or base not in ("required", "optional", "unused"):
    raise ValueError(f"{name}: bad kind {kind!r} or base policy {base!r}")

  def wrap(fn):
    if name in _METHODS:
      raise ValueError(f"merge method {name!r} is already registered")
    method = MergeMethod(name, fn, kind, base, tuple(per_model), tuple(tensor_params), jit,
                         tuple(sorted((estimators or {}).items())))
    object.__setattr__(method, "__doc__", fn.__doc__)
    _METHODS[name] = method
    return method
  return wrap


def get(name: str) -> MergeMethod:
  if name not in _METHODS:
    raise KeyError(f"unknown merge method {name!r}; registered: {names()}")
  return _METHODS[name]


def names() -> list[str]:
  return sorted(_METHODS)


# ---------------------------------------------------------------------------------------------------
# The tree driver
# ---------------------------------------------------------------------------------------------------
def _is_float(x) -> bool:
  """Floating leaves are merged (bfloat16 included); integer or boolean ones are copied."""
  return jnp.issubdtype(getattr(x, "dtype", np.asarray(x).dtype), jnp.floating)


def merge_trees(method: MergeMethod, base, models, *, seed: int = 0, stacked: Optional[str] = STACKED,
                **params):
  """Applies `method` to a base tree (or None) and a list of model trees; returns a tree like `base`.

  Adapter nodes in the trees are merged into their weights first (`peft.merge`). Non-float leaves are
  copied from the base (or the first model). `stacked`: regex of paths with a
  leading layer axis merged layer by layer (None: never split).
  """
  models = list(models)
  if not models:
    raise ValueError(f"{method.name}: no models to merge")
  if method.base == "required" and base is None:
    raise ValueError(f"{method.name} needs a base model")
  params = method.check_params(params)
  params.pop("stacked", None)
  params.pop("seed", None)
  # Adapter nodes (LoRA, DoRA, ...) are folded into plain weights first: a merge sees whole models.
  base = None if base is None else peft.merge(base)
  models = [peft.merge(m) for m in models]
  nested = isinstance(models[0], Mapping) and any(isinstance(v, Mapping) for v in models[0].values())
  flat = [flatten(m) for m in models]
  flat_base = flatten(base) if base is not None else None
  for i, f in enumerate(flat[1:], 1):
    if set(f) != set(flat[0]):
      raise ValueError(f"model {i} has other tensors than model 0: {sorted(set(f) ^ set(flat[0]))[:5]}")
  if flat_base is not None and set(flat_base) != set(flat[0]):
    raise ValueError(f"the base has other tensors than the models: {sorted(set(flat_base) ^ set(flat[0]))[:5]}")
  tparams = {k: [flatten(t) for t in params.pop(k)] for k in method.tensor_params if k in params}

  if method.kind == "model":
    out = _merge_model(method, flat_base, flat, seed, params)
  else:
    out = {}
    for path in flat[0]:
      b = flat_base[path] if flat_base is not None else None
      xs = [f[path] for f in flat]
      ref = b if b is not None else xs[0]
      if not _is_float(ref):
        out[path] = ref
        continue
      tp = {k: [t[path] for t in v] for k, v in tparams.items()}
      if stacked and re.fullmatch(stacked, path) and np.ndim(ref) >= 1:
        layers = []
        for l in range(np.shape(ref)[0]):
          tpl = {k: [t[l] for t in v] for k, v in tp.items()}
          layers.append(_one(method, None if b is None else b[l], [x[l] for x in xs], path, f"{path}[{l}]",
                             seed, params, tpl))
        out[path] = jnp.stack(layers)
      else:
        out[path] = _one(method, b, xs, path, path, seed, params, tp)
  return unflatten(out) if nested else out


def _one(method, b, xs, path, key_path, seed, params, tp):
  ref = b if b is not None else xs[0]
  kw = method._resolved(params, path, len(xs))
  kw.update(tp)
  out = method.kernel(None if b is None or method.base == "unused" else b, list(xs), path=key_path,
                      key=tensor_key(seed, key_path), row_axis=row_axis_of(path, np.ndim(ref)), **kw)
  return out.astype(ref.dtype)


def _merge_model(method, flat_base, flat, seed, params):
  paths = list(flat[0])
  floats = [p for p in paths if _is_float(flat[0][p])]
  f32 = lambda d: {p: jnp.asarray(d[p], jnp.float32) for p in floats}
  kw = {k: v for k, v in params.items()}
  merged = method.fn(None if flat_base is None else f32(flat_base), [f32(f) for f in flat], seed=seed, **kw)
  ref = flat_base if flat_base is not None else flat[0]
  return {p: (merged[p].astype(ref[p].dtype) if p in merged else ref[p]) for p in paths}
