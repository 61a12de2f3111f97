"""NOLA: LoRA factors as trained linear combinations of frozen random bases regenerated from a seed.

    A = sum_i alpha_i A_i,   B = sum_j beta_j B_j,   y = x W0 + s (x A) B,   s = alpha / r
    A_i [in, r] (i < k), B_j [r, out] (j < l): random, frozen, never stored;  alpha [k], beta [l]: trained

(Koohpayegani et al., 2024, "NOLA: Compressing LoRA using Linear Combination of Random Basis",
arXiv:2310.02556; code `UCDvision/NOLA`.) PEFT has no NOLA; the tests check the forward and the merge against a
float64 evaluation of the formula above.

The bases are regenerated inside the layer from a per-layer key (`key [..., 2]`, frozen, derived from
`options.basis_seed` and the kernel's path), so the parameters hold only k + l trained scalars and one key per
layer: the bases exist only inside the step, as activations (recomputed under remat). A_i is
Kaiming-uniform as LoRA's A (bound 1/sqrt(in)), B_j uniform with bound 1/sqrt(r) (our choice; not checked
against the authors' code). beta starts at 0, so the adapter starts as the identity; alpha is
uniform with bound 1/sqrt(k) (our choice).
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from peft._core import Adapter, dot
from peft._lora import base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, static_field
from peft._quant import float_weight
from peft._vera import kernel_shape


def nola_bases(key: jax.Array, k: int, l: int, rank: int, n_in: int, n_out: int):
  """One layer's (A_bases [k, in, r], B_bases [l, r, out]) float32 from its key [2]; bit-exact (one rounding).
  One draw for both (a threefry call is slow to compile on CPU)."""
  n_a = k * n_in * rank
  u = jax.random.uniform(key, (n_a + l * rank * n_out,), jnp.float32)
  ua, ub = u[:n_a].reshape(k, n_in, rank), u[n_a:].reshape(l, rank, n_out)
  return (jnp.float32(1.0 / math.sqrt(n_in)) * (2.0 * ua - 1.0),
          jnp.float32(1.0 / math.sqrt(rank)) * (2.0 * ub - 1.0))


@adapter_node
class NOLA(Adapter):
  base: Any                              # [..., in, out] kernel or QuantizedWeight
  coef_a: jax.Array                      # [..., k] trained (alpha_i)
  coef_b: jax.Array                      # [..., l] trained (beta_j)
  key: jax.Array                         # [..., 2] uint32, frozen: the layer's basis key
  rank: int = static_field(default=8)
  scale: float = static_field(default=1.0)

  trainable_fields = ("coef_a", "coef_b")

  def factors(self, dtype=jnp.float32):
    """(A [..., in, r], B [..., r, out]) = (sum_i alpha_i A_i, sum_j beta_j B_j)."""
    n_in, n_out = kernel_shape(self.base)[-2:]
    k, l = self.coef_a.shape[-1], self.coef_b.shape[-1]
    gen = lambda key: nola_bases(key, k, l, self.rank, n_in, n_out)
    keys = self.key.reshape((-1, 2))
    ab, bb = jax.vmap(gen)(keys)
    lead = self.key.shape[:-1]
    ab, bb = ab.reshape(lead + ab.shape[1:]), bb.reshape(lead + bb.shape[1:])
    a = jnp.einsum("...k,...kir->...ir", self.coef_a.astype(jnp.float32), ab)
    b = jnp.einsum("...l,...lro->...ro", self.coef_b.astype(jnp.float32), bb)
    return a.astype(dtype), b.astype(dtype)

  def dot(self, x):
    a, b = self.factors(x.dtype)
    return dot(x, self.base) + self.scale * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)

  def materialize(self):
    a, b = self.factors()
    w = float_weight(self.base, jnp.float32) + self.scale * jnp.einsum("...ir,...ro->...io", a, b)
    return w.astype(base_dtype(self.base))


@register_adapter("nola")
def make_nola(base, spec: AdapterSpec, rng, path: str) -> NOLA:
  """spec.rank = r, spec.alpha (s = alpha / r); spec.options: `num_basis_a` (k, 64), `num_basis_b` (l, 64),
  `basis_seed` (0). The bases depend only on the seed, the path and the layer, never on `rng`."""
  if spec.dropout:
    raise ValueError("nola: dropout is not supported; use dropout=0")
  if spec.init != "default":
    raise ValueError(f"nola has no init {spec.init!r}: alpha uniform, beta = 0")
  k, l = int(spec.options.get("num_basis_a", 64)), int(spec.options.get("num_basis_b", 64))
  lead = kernel_shape(base)[:-2]
  root = jax.random.fold_in(jax.random.PRNGKey(int(spec.options.get("basis_seed", 0))),
                            zlib.crc32(path.encode()) & 0x7FFFFFFF)
  keys = jax.random.split(root, max(math.prod(lead), 1)).reshape(lead + (2,))
  coef_a = jax.random.uniform(rng, lead + (k,), jnp.float32, -1.0, 1.0) / math.sqrt(k)
  return NOLA(base, coef_a.astype(spec.dtype), jnp.zeros(lead + (l,), spec.dtype), keys,
              rank=spec.rank, scale=spec.scale)
