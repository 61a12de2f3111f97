r"""MoS (Mixture of Shards): every layer's LoRA factors assembled from shard pools shared across layers.

Wang et al., 2024, *MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards*
(arXiv 2410.00938); reference `Forence1999/MoS`. The update of layer ℓ is LoRA's,
y = x W0 + s (x A_ℓ) B_ℓ with s = α / r, but A_ℓ and B_ℓ own no parameters: each of their r rank vectors
(columns of A_ℓ [in, r], rows of B_ℓ [r, out]) is the concatenation of l shards (vector sharding), each
shard a row of a pool shared by every layer of the stack,

.. math::

  A_\ell[:, j] = [P_A[i^A_{\ell j 1}]; \dots; P_A[i^A_{\ell j l}]]_{:in}, \qquad
  B_\ell[j, :] = [P_B[i^B_{\ell j 1}]; \dots; P_B[i^B_{\ell j l}]]_{:out}

(shards of length ceil(in / l), ceil(out / l); the concatenation is cut to the width, as the reference's
`de_reduce`). The index "router" is static: drawn once from the seed and stored (frozen, int32).

**Our reading of the index scheme** (the released code shows chunk-wise sharing only, so this follows the
paper's four strategies as we read them):
* *shard privatization*: each pool is [public shards | private shards of layer 0 | ... | of layer L-1];
  layer ℓ's first `private` slots (of its r·l) take its own private shards, in order;
* *subset selection*: its other r·l − `private` slots take distinct public shards drawn uniformly without
  replacement, independently per layer;
* *pair dissociation*: A's and B's indices are drawn independently (separate pools P_A, P_B);
* *vector sharding*: the l shards of one rank vector are separate draws.
Defaults (our choice): l = 2 (`shards_per_vector`), `private` = r·l / 4 per layer, `public` = L·r·l / 4
shards, so a stack trains (public + L·private)(ceil(in/l) + ceil(out/l)) parameters: half of LoRA's
L·r(in + out) at the same rank. Init as LoRA: P_A Kaiming-uniform (bound 1/sqrt(in)), P_B = 0.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, static_field
from peft._quant import float_weight


def assemble(pool: jax.Array, idx: jax.Array, width: int) -> jax.Array:
  """[..., r, width]: rank vectors from pool [S, len] and indices [..., r, l] (concatenated, cut)."""
  shards = jnp.take(pool, idx, axis=0)                        # [..., r, l, len]
  return shards.reshape(shards.shape[:-2] + (-1,))[..., :width]


@adapter_node
class MoS(Adapter):
  base: Any                          # [..., in, out] kernel or QuantizedWeight
  pool_a: Optional[jax.Array]        # [S_a, ceil(in / l)]  shared by every layer (no layer axis)
  pool_b: Optional[jax.Array]        # [S_b, ceil(out / l)]
  idx_a: jax.Array                   # [..., r, l] int32, frozen
  idx_b: jax.Array                   # [..., r, l] int32, frozen
  scale: float = static_field(default=1.0)

  trainable_fields = ("pool_a", "pool_b")

  def factors(self):
    """(A [..., in, r], B [..., r, out])."""
    din, dout = _io(self.base)
    a = assemble(self.pool_a, self.idx_a, din)
    return jnp.swapaxes(a, -1, -2), assemble(self.pool_b, self.idx_b, dout)

  # The pools carry no layer axis: the layer scan slices the indices and closes over the pools.
  def scan_parts(self):
    return self.replace(pool_a=None, pool_b=None), (self.pool_a, self.pool_b)

  def scan_bind(self, closed):
    return self.replace(pool_a=closed[0], pool_b=closed[1])

  def dot(self, x):
    a, b = self.factors()
    low = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype))
    return dot(x, self.base) + self.scale * jnp.einsum("...r,ro->...o", low, b.astype(x.dtype))

  def materialize(self):
    a, b = self.factors()
    w = float_weight(self.base, jnp.float32) + self.scale * jnp.einsum(
        "...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return w.astype(base_dtype(self.base))


def _io(base) -> tuple[int, int]:
  return tuple(base.shape[-2:])


def shard_indices(rng: np.random.Generator, layers: int, rank: int, l: int, public: int,
                  private: int) -> np.ndarray:
  """[layers, rank, l] indices into [public | private of layer 0 | ...] (module docstring's scheme)."""
  slots = rank * l
  if not 0 <= private <= slots or public < slots - private:
    raise ValueError(f"mos: each layer fills {slots} shard slots with {private} private shards and "
                     f"{slots - private} distinct public ones, but the public pool holds {public}")
  out = np.empty((layers, slots), np.int32)
  for layer in range(layers):
    own = public + layer * private + np.arange(private)
    shared = rng.choice(public, slots - private, replace=False)
    out[layer] = np.concatenate([own, shared])
  return out.reshape(layers, rank, l)


@register_adapter("mos")
def make_mos(base, spec: AdapterSpec, rng, path: str) -> MoS:
  """spec.rank, spec.alpha (s = alpha / r); options: `shards_per_vector` (2), `private` (r l / 4 per layer),
  `public` (L r l / 4)."""
  del path
  if spec.init != "default":
    raise ValueError(f"mos has no init {spec.init!r}")
  shape = tuple(base.shape) if hasattr(base, "ndim") else tuple(base.codes.shape[:-2]) + tuple(base.shape)
  lead, (din, dout) = shape[:-2], shape[-2:]
  layers, r = math.prod(lead), spec.rank
  l = int(spec.options.get("shards_per_vector", 2))
  private = int(spec.options.get("private", (r * l) // 4))
  public = int(spec.options.get("public", max(r * l - private, (layers * r * l) // 4)))
  k_a, k_b, k_pool = jax.random.split(rng, 3)
  seed = lambda k: np.random.default_rng(np.asarray(jax.random.key_data(k) if jnp.issubdtype(
      k.dtype, jax.dtypes.prng_key) else k).astype(np.uint32).tolist())
  idx_a = shard_indices(seed(k_a), layers, r, l, public, private).reshape(lead + (r, l))
  idx_b = shard_indices(seed(k_b), layers, r, l, public, private).reshape(lead + (r, l))
  size = public + layers * private
  bound = 1.0 / math.sqrt(din)
  dt = jnp.dtype(spec.dtype)
  pool_a = jax.random.uniform(k_pool, (size, -(-din // l)), jnp.float32, -bound, bound).astype(dt)
  pool_b = jnp.zeros((size, -(-dout // l)), dt)
  return MoS(base, pool_a, pool_b, jnp.asarray(idx_a), jnp.asarray(idx_b), scale=spec.scale)
