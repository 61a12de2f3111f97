r"""Layer-sampling slots: the adapter node behind LISA / OwLore, with static shapes.

Every leaf under the stacked `layers` becomes a `SampledLayers` node holding the whole stack `base [L, ...]`
(frozen), the sampled blocks' weights `slots [gamma, ...]` (the only trainable part) and their indices
`idx [gamma]`. Gradients and optimizer state therefore exist for gamma blocks plus the embeddings, final
norm and head. The model's layer scan slices `base` and a per-layer slot position and closes over the
slots (`peft.scan_split`); each layer's matmul picks its slot or its frozen weight under `lax.cond` inside
`jax.checkpoint`, so no `[L, ...]` copy of the weights and no `[L, ...]` weight gradient is ever built (a
`stop_gradient(base).at[idx].set(slots)` before the scan costs both), and unsampled layers skip their weight
gradient.

`resample(trainable, frozen, idx)` writes the slots back into `base` and gathers the blocks `idx`, every
shape and sharding unchanged. Which blocks, when, and what happens to the optimizer state is the layer
sampling of `optim` (`optim/_sampling.py`).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot, is_adapter, path_str
from peft._node import adapter_node, static_field


# =========================================================================================================
# The slot node
# =========================================================================================================
@adapter_node
class SampledLayers(Adapter):
  """A stacked leaf under `layers` of which only the blocks `idx` train (as `slots`)."""
  base: jax.Array     # [L, ...] every block's weight; the sampled blocks' entries are stale until write-back
  slots: jax.Array    # [gamma, ...] the sampled blocks' weights (trainable)
  idx: jax.Array      # [gamma] int32, ascending: the sampled blocks
  # L, as tree structure: the trainable part alone (slots, no base) still knows the depth of the stack, which
  # the optimizer's per-block state store is sized by (`optim/_sampling.py`, `state=persist`).
  num_blocks: int = static_field(default=0)

  trainable_fields = ("slots",)
  trains_base = True

  def materialize(self) -> jax.Array:
    return jax.lax.stop_gradient(self.base).at[self.idx].set(self.slots.astype(self.base.dtype))

  def frozen_base(self) -> jax.Array:
    # There is no separate frozen weight: the stack is trained in place. (`has_adapters` is False for these
    # nodes, so the trainer's reference model is a frozen copy, never this.)
    return self.materialize()

  def dot(self, x):
    return dot(x, self.materialize())

  def scan_parts(self):
    L, gamma = self.base.shape[0], self.idx.shape[0]
    pos = jnp.full((L,), -1, jnp.int32).at[self.idx].set(jnp.arange(gamma, dtype=jnp.int32))
    return _LayerSlot(self.base, pos, None), self.slots


@jax.checkpoint
def _slot_dot(x, base, pos, slots):
  # Recomputed in the backward pass, so the chosen weight is not saved per layer; the cond skips the weight
  # gradient of an unsampled layer.
  def sampled():
    return dot(x, jax.lax.dynamic_index_in_dim(slots, jnp.maximum(pos, 0), keepdims=False))
  return jax.lax.cond(pos >= 0, sampled, lambda: dot(x, jax.lax.stop_gradient(base)))


@adapter_node
class _LayerSlot(Adapter):
  """One layer of a `SampledLayers` stack inside the layer scan."""
  base: jax.Array              # [...] this layer's frozen weight
  pos: jax.Array               # () int32: its slot, or -1 when not sampled
  slots: Optional[jax.Array]   # [gamma, ...] all slots (closed over by the scan body)

  trains_base = True

  def scan_bind(self, closed):
    bound = self.replace(slots=closed)
    # Matrices go through `peft.dot`; norm scales and biases are used as arrays.
    return bound if self.base.ndim >= 2 else bound.materialize()

  def materialize(self):
    slot = jax.lax.dynamic_index_in_dim(self.slots, jnp.maximum(self.pos, 0), keepdims=False)
    return jnp.where(self.pos >= 0, slot.astype(self.base.dtype), jax.lax.stop_gradient(self.base))

  def dot(self, x):
    return _slot_dot(x, self.base, self.pos, self.slots)


def is_sampled(x) -> bool:
  return isinstance(x, SampledLayers)


def sample_layers(params, idx) -> Any:
  """Wraps every array under `params["layers"]` in a `SampledLayers` node training the blocks `idx`."""
  idx = jnp.asarray(np.sort(np.asarray(idx)), jnp.int32)

  def wrap(path, x):
    if is_adapter(x):
      raise ValueError(f"layer sampling trains whole blocks; {path_str(path)!r} is already an adapter node "
                       f"({type(x).__name__}): sampling over adapters is not supported")
    return SampledLayers(base=x, slots=jnp.take(x, idx, axis=0), idx=idx, num_blocks=int(x.shape[0]))

  layers = jax.tree_util.tree_map_with_path(wrap, params["layers"], is_leaf=is_adapter)
  return {**params, "layers": layers}


def sampled_blocks(params_or_frozen) -> np.ndarray:
  """The blocks the slots hold now ([gamma] int)."""
  nodes = [l for l in jax.tree.leaves(params_or_frozen, is_leaf=is_sampled) if is_sampled(l)]
  if not nodes:
    raise ValueError("no SampledLayers nodes in the tree")
  return np.asarray(jax.device_get(nodes[0].idx))


# =========================================================================================================
# Host-side resampling
# =========================================================================================================
@jax.jit
def _write_back(trainable, frozen, new_idx):
  is_leaf = lambda x: x is None or is_sampled(x)

  def one(t, f):
    if not is_sampled(t):
      return f
    base = f.base.at[f.idx].set(t.slots.astype(f.base.dtype))
    return f.replace(base=base, idx=new_idx)
  frozen = jax.tree.map(one, trainable, frozen, is_leaf=is_leaf)
  trainable = jax.tree.map(lambda t, f: t.replace(slots=jnp.take(f.base, f.idx, axis=0)) if is_sampled(t) else t,
                           trainable, frozen, is_leaf=is_leaf)
  return trainable, frozen


def resample(trainable, frozen, idx):
  """(trainable, frozen) with the slots written back into the bases and the blocks `idx` gathered.
  Every leaf keeps its shape, dtype and sharding."""
  t, f = _write_back(trainable, frozen, jnp.asarray(idx, jnp.int32))
  return place_like(t, trainable), place_like(f, frozen)


def place_like(new, old):
  """`new` placed with the shardings of `old` (leaf by leaf), so the jitted step sees the same inputs."""
  def put(n, o):
    sharding = getattr(o, "sharding", None)
    return jax.device_put(n, sharding) if sharding is not None else n
  return jax.tree.map(put, new, old)
