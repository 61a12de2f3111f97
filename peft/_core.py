"""The one linear-layer dispatch, and the split of a parameter tree into trainable and frozen parts.

Every matmul of the model goes through `dot(x, w)`. A plain array is multiplied; an `Adapter` node (a
pytree dataclass holding the frozen base and its trainable parts) applies itself. Model code therefore never
knows which adapter it runs, and parameter paths never move: an adapter replaces the leaf `.../kernel` by a
node whose children are `.../kernel/base`, `.../kernel/a`, ...

Trainable and frozen trees keep the full structure, with `None` where the other tree holds the value, so
`combine(*split(params))` is the identity and optax/orbax see only real arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

Params = Any


class Adapter:
  """Base class of adapter nodes. Subclasses are `flax.struct.dataclass`es with a `base` field.

  Subclasses set `trainable_fields` (the names of their trainable children) and implement `dot` and
  `materialize` (the equivalent plain weight, i.e. the merge).
  """
  trainable_fields: ClassVar[tuple[str, ...]] = ()
  # A node that trains the weight itself rather than a delta on a frozen base (layer sampling): it is no
  # adapter for `has_adapters` (so plain arrays stay trainable in `split`, and the reference model of a
  # preference loss is a frozen copy, since `frozen_base()` is not the pre-training weight).
  trains_base: ClassVar[bool] = False

  def dot(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  # The model's `lax.scan` over stacked layers slices every child along axis 0. A node under the stacked
  # `layers` whose children do not all carry that axis (layer sampling's `slots [gamma, ...]`) splits
  # itself: `scan_parts()` -> (sliced, closed over whole), and in the scan body `sliced_slice.scan_bind(
  # closed)` rebuilds the per-layer weight or node. See `scan_split` / `scan_bind` below.
  def scan_parts(self) -> tuple[Any, Any]:
    return self, None

  def scan_bind(self, closed) -> Any:
    del closed
    return self

  def materialize(self) -> jax.Array:
    raise NotImplementedError

  def frozen_base(self) -> jax.Array:
    """The weight of the model without this adapter (the reference model's weight)."""
    return getattr(self, "base")

  def regularizer(self) -> dict[str, tuple[jax.Array, float]] | None:
    """Penalties this node adds to the training loss (AdaLoRA's orthogonality, SoRA's gate L1), or None.

    {term: (total, count)}: `peft.regularizer` pools each term over all nodes as sum(total) / sum(count),
    a mean over every matrix of the model as the references average (count 0: a plain sum). Weights
    are applied inside `total`."""
    return None


def is_adapter(x) -> bool:
  return isinstance(x, Adapter)


def dot(x: jax.Array, w) -> jax.Array:
  """`x @ w` over the last axis of x, in x's dtype; adapters apply themselves."""
  if is_adapter(w):
    return w.dot(x)
  return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def _is_leaf(x) -> bool:
  return x is None or is_adapter(x)


def split(params: Params, train_base: bool | None = None) -> tuple[Params, Params]:
  """(trainable, frozen). By default plain arrays are frozen as soon as the tree holds an adapter
  (HF PEFT's behaviour) and trainable otherwise (full fine-tuning, layer sampling included)."""
  if train_base is None:
    train_base = not has_adapters(params)

  def part(leaf, want_trainable: bool):
    if leaf is None:
      return None
    if is_adapter(leaf):
      # Static fields (rank, scale, ...) are tree metadata, not children: never replace them by None.
      fields = {f.name for f in dataclasses.fields(leaf) if f.metadata.get("pytree_node", True)}
      keep = set(leaf.trainable_fields) if want_trainable else fields - set(leaf.trainable_fields)
      return leaf.replace(**{f: None for f in fields - keep})
    return leaf if want_trainable == train_base else None

  return (jax.tree.map(lambda l: part(l, True), params, is_leaf=_is_leaf),
          jax.tree.map(lambda l: part(l, False), params, is_leaf=_is_leaf))


def combine(trainable: Params, frozen: Params) -> Params:
  """Inverse of `split`."""
  def join(t, f):
    if t is None:
      return f
    if is_adapter(t):
      return jax.tree.map(lambda a, b: b if a is None else a, t, f, is_leaf=lambda z: z is None)
    return t
  return jax.tree.map(join, trainable, frozen, is_leaf=_is_leaf)


def merge(params: Params) -> Params:
  """Folds every adapter into a plain weight."""
  return jax.tree.map(lambda l: l.materialize() if is_adapter(l) else l, params, is_leaf=is_adapter)


def regularizer(params: Params) -> jax.Array | None:
  """The adapters' loss penalty: for each term of `Adapter.regularizer`, sum(total) / sum(count) over the
  nodes (count 0 everywhere: the plain sum), added up over terms; None when no node has one, so runs
  without such adapters trace nothing."""
  pooled: dict[str, list] = {}
  for leaf in jax.tree.leaves(params, is_leaf=is_adapter):
    terms = leaf.regularizer() if is_adapter(leaf) else None
    for name, (total, n) in (terms or {}).items():
      acc = pooled.setdefault(name, [0.0, 0.0])
      acc[0], acc[1] = acc[0] + total, acc[1] + n
  if not pooled:
    return None
  return sum(t / (n if n else 1.0) for t, n in pooled.values())


def strip(params: Params) -> Params:
  """The base model: every adapter replaced by its frozen base weight (the free reference model)."""
  return jax.tree.map(lambda l: l.frozen_base() if is_adapter(l) else l, params, is_leaf=is_adapter)


def has_adapters(params: Params) -> bool:
  """Whether the tree holds adapter nodes (nodes that train the base weight itself do not count)."""
  return any(is_adapter(l) and not l.trains_base for l in jax.tree.leaves(params, is_leaf=is_adapter))


def scan_split(layers: Params) -> tuple[Params, Params]:
  """(xs, closed) for a `lax.scan` over stacked layers: what the scan slices, and what its body closes over
  (None where nothing). The identity for plain arrays and for nodes whose children all carry the layer axis."""
  xs = jax.tree.map(lambda l: l.scan_parts()[0] if is_adapter(l) else l, layers, is_leaf=is_adapter)
  closed = jax.tree.map(lambda l: l.scan_parts()[1] if is_adapter(l) else None, layers, is_leaf=is_adapter)
  return xs, closed


def scan_bind(layer: Params, closed: Params) -> Params:
  """Inside the scan body: one layer's slice of `xs` joined with `closed` (see `scan_split`)."""
  return jax.tree.map(lambda l, c: l.scan_bind(c) if is_adapter(l) else l, layer, closed, is_leaf=is_adapter)


def count(params: Params) -> int:
  """Number of scalars in the real (non-None) leaves."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def map_with_path(fn: Callable[[str, Any], Any], params: Params, is_leaf=None) -> Params:
  """tree_map with the '/'-joined key path as first argument."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params, is_leaf=is_leaf)


def path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten(params: Params) -> dict[str, jax.Array]:
  """{'/'-joined path: array} of the real leaves (adapter children included)."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[path_str(p)] = x
  return out
