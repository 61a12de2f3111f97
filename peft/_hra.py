"""HRA: the frozen weight times a chain of r trained Householder reflections.

    W' = W H,   H = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / ||u_i||^2        (torch layout W [out, in])
    y = x W'^T = (x H_r ... H_1) W0                                           (ours: kernel W0 = W^T [in, out])

(Yuan et al., 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation", arXiv:2405.17484; PEFT `tuners/hra`.) U = [u_1 ... u_r] is [in, r]. With `apply_GS`
(`options={"apply_GS": True}`) U is first orthonormalised by Gram-Schmidt (in column order, as PEFT), and the
r reflections become one, H = I - 2 U U^T. The forward reflects the input (r rank-1 updates of x) and never
builds H; `materialize` applies the reflections to W0.

Init (PEFT's `init_weights=True`, the default): r/2 Kaiming-uniform vectors (a = sqrt(5) over a [in, r/2]
tensor, so the bound is 1/sqrt(r/2) as in PEFT), each repeated twice in a row; H_i H_i = I, so the adapter
starts as the identity (odd r: r independent vectors, not the identity, as PEFT). `options={"init_weights":
False}` is PEFT's `init_weights=False` (all r vectors Kaiming-uniform). With `apply_GS` the repeated vectors
leave Gram-Schmidt only rounding residues to normalise, so that start is no identity and depends on rounding
(in PEFT too): use `init_weights=False` with `apply_GS`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import _stack, base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, register_hf_format, static_field
from peft._quant import float_weight
from peft._vera import kernel_shape


def gram_schmidt(u: jax.Array) -> jax.Array:
  """[in, r] -> orthonormal columns, each column minus its projections on the earlier (modified GS)."""
  cols = []
  for i in range(u.shape[-1]):
    c = u[:, i]
    for q in cols:
      c = c - jnp.dot(q, c) * q
    cols.append(c / jnp.linalg.norm(c))
  return jnp.stack(cols, axis=-1)


def reflect(x: jax.Array, u: jax.Array, apply_gs: bool) -> jax.Array:
  """x H^T = x H_r ... H_1 for row vectors x [..., in] and one layer's u [in, r]."""
  if apply_gs:
    q = gram_schmidt(u)
    return x - 2.0 * jnp.einsum("...r,ir->...i", jnp.einsum("...i,ir->...r", x, q), q)
  un = u / jnp.linalg.norm(u, axis=0)
  def one(x, v):                          # x H_i with H_i = I - 2 v v^T (v unit)
    return x - 2.0 * jnp.einsum("...i,i->...", x, v)[..., None] * v, None
  return jax.lax.scan(one, x, un.T[::-1])[0]


@register_hf_format
@adapter_node
class HRA(Adapter):
  base: Any                              # [..., in, out] kernel or QuantizedWeight
  u: jax.Array                           # [..., in, r] trained
  apply_gs: bool = static_field(default=False)

  trainable_fields = ("u",)
  hf_peft_type = "HRA"

  def dot(self, x):
    return dot(reflect(x, self.u.astype(x.dtype), self.apply_gs), self.base)

  def materialize(self):
    w = float_weight(self.base, jnp.float32)
    n_in = w.shape[-2]
    u = self.u.astype(jnp.float32).reshape((-1,) + self.u.shape[-2:])
    # H^T = H_r ... H_1: the reflected rows of the identity; W' (ours) = H^T W0.
    ht = jax.vmap(lambda v: reflect(jnp.eye(n_in, dtype=jnp.float32), v, self.apply_gs))(u)
    ht = ht.reshape(self.u.shape[:-2] + (n_in, n_in))
    return jnp.einsum("...ij,...jo->...io", ht, w).astype(base_dtype(self.base))

  # ---- HF PEFT format (peft/_export.py) ---------------------------------------------------------------
  hf_tensor_names = ("hra_u",)

  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  def hf_tensors(self):
    return {"hra_u": np.asarray(self.u)}     # PEFT's hra_u is [in, r], as ours

  @classmethod
  def hf_config(cls, nodes, spec):
    ranks = {n.u.shape[-1] for n in nodes.values()}
    gs = {n.apply_gs for n in nodes.values()}
    if len(ranks) > 1 or len(gs) > 1:
      raise ValueError(f"one r and one apply_GS per PEFT HRA adapter, got r={sorted(ranks)}, apply_GS={sorted(gs)}")
    return {"peft_type": "HRA", "r": ranks.pop(), "apply_GS": gs.pop(), "init_weights": True, "bias": "none"}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked):
    return cls(base, _stack([l["hra_u"] for l in layers], stacked), apply_gs=bool(config.get("apply_GS", False)))


def _kaiming_a5(key, shape):
  """torch's kaiming_uniform_(a=sqrt(5)) on a [in, n] tensor: bound 1/sqrt(fan_in) with fan_in = n."""
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) / math.sqrt(shape[-1])


@register_adapter("hra")
def make_hra(base, spec: AdapterSpec, rng, path: str) -> HRA:
  """spec.rank = r (number of reflections); spec.options: `apply_GS` (False), `init_weights` (True: symmetric
  pairs, the identity; False: random). alpha, init and dropout do not apply."""
  del path
  if spec.init != "default":
    raise ValueError(f"hra has no init {spec.init!r}; use options.init_weights (True: identity, False: random)")
  if spec.dropout:
    raise ValueError("hra: dropout is not supported; use dropout=0")
  shape = kernel_shape(base)
  lead, n_in, r = shape[:-2], shape[-2], spec.rank
  if spec.options.get("init_weights", True) and r % 2 == 0:
    u = jnp.repeat(_kaiming_a5(rng, lead + (n_in, r // 2)), 2, axis=-1)
  else:
    u = _kaiming_a5(rng, lead + (n_in, r))
  return HRA(base, u.astype(spec.dtype), apply_gs=bool(spec.options.get("apply_GS", False)))
