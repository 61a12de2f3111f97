"""VeRA: one pair of frozen random matrices shared by every targeted layer; each layer trains two vectors.

    y = x W0 + ((x A) * d) B * b,    ΔW = A diag(d) B diag(b)       A [in, r], B [r, out] (frozen, shared)
                                                                     d [r], b [out]          (trained, per layer)

(Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454; PEFT
`tuners/vera`.) A and B are drawn once for the largest targeted layer, A_full [max_in, r] and
B_full [r, max_out]; a layer uses the leading rows A_full[:in] and columns B_full[:, :out]. Both are
Kaiming-uniform with gain sqrt(2) over PEFT's fan-in (bounds sqrt(6 / max_in) and sqrt(6 / r)). They are
regenerated bit-exactly from `projection_prng_key` (`vera_basis`), never trained, so a checkpoint of the
trainable tree never holds them; `peft.apply` rebuilds them from the seed. PEFT's init: b = 0 (the adapter
starts as the identity), d = `d_initial` (0.1).

The basis carries no layer axis: under the model's `lax.scan` over stacked layers the node slices only
d, b and the base and closes over A and B (`scan_parts` / `scan_bind`).

Differences from PEFT: PEFT draws the basis with torch's CPU generator, which JAX cannot reproduce, so the same
seed gives another basis here (same distribution). Exported adapters carry the basis (`save_projection=True`),
and an imported adapter uses the basis in its file; an adapter saved with `save_projection=False` cannot be
imported. `vera_dropout` is not supported (dropout must be 0).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import _stack, base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, register_hf_format
from peft._quant import float_weight


def kernel_shape(base) -> tuple[int, ...]:
  """[..., in, out] of a plain kernel or a QuantizedWeight."""
  return tuple(base.shape) if hasattr(base, "ndim") else tuple(base.codes.shape[:-2]) + tuple(base.shape)


def vera_basis(seed: int, rank: int, n_in: int, n_out: int) -> tuple[jax.Array, jax.Array]:
  """(A [n_in, r], B [r, n_out]) float32, Kaiming-uniform as PEFT's `_kaiming_init` (gain sqrt(2), fan-in
  n_in for A and r for B). `bound * (2u - 1)` rounds once, so the values are the same bits under any jit.
  One draw for both (a threefry call is slow to compile on CPU)."""
  u = jax.random.uniform(jax.random.PRNGKey(seed), (n_in * rank + rank * n_out,), jnp.float32)   # [0, 1)
  ua, ub = u[:n_in * rank].reshape(n_in, rank), u[n_in * rank:].reshape(rank, n_out)
  kaiming = lambda u, fan_in: jnp.float32(math.sqrt(6.0 / fan_in)) * (2.0 * u - 1.0)   # 2u - 1 is exact
  return kaiming(ua, n_in), kaiming(ub, rank)


@register_hf_format
@adapter_node
class VeRA(Adapter):
  base: Any                          # [..., in, out] kernel or QuantizedWeight
  lambda_d: jax.Array                # [..., r]   trained
  lambda_b: jax.Array                # [..., out] trained
  a: Optional[jax.Array] = None      # [in, r]    frozen: A_full[:in] (no layer axis)
  b: Optional[jax.Array] = None      # [r, out]   frozen: B_full[:, :out]

  trainable_fields = ("lambda_d", "lambda_b")
  hf_peft_type = "VERA"

  # The shared basis has no layer axis: the scan slices the rest and closes over it.
  def scan_parts(self):
    return self.replace(a=None, b=None), (self.a, self.b)

  def scan_bind(self, closed):
    return self.replace(a=closed[0], b=closed[1])

  def dot(self, x):
    low = jnp.einsum("...i,ir->...r", x, self.a.astype(x.dtype)) * self.lambda_d.astype(x.dtype)
    up = jnp.einsum("...r,ro->...o", low, self.b.astype(x.dtype)) * self.lambda_b.astype(x.dtype)
    return dot(x, self.base) + up

  def delta(self) -> jax.Array:
    """A diag(d) B diag(b) [..., in, out] in float32."""
    f32 = lambda t: t.astype(jnp.float32)
    return jnp.einsum("ir,...r,ro,...o->...io", f32(self.a), f32(self.lambda_d), f32(self.b), f32(self.lambda_b))

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(base_dtype(self.base))

  # ---- HF PEFT format (peft/_export.py) ---------------------------------------------------------------
  hf_tensor_names = ("vera_lambda_d", "vera_lambda_b")
  hf_shared_names = ("base_model.vera_A", "base_model.vera_B")

  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  def hf_tensors(self):
    return {"vera_lambda_d": np.asarray(self.lambda_d), "vera_lambda_b": np.asarray(self.lambda_b)}

  @classmethod
  def hf_shared(cls, nodes: dict) -> dict:
    """PEFT's vera_A [r, max_in] and vera_B [max_out, r]: the largest slices, of which every other node's
    must be the leading part (one shared basis)."""
    a = max((np.asarray(n.a) for n in nodes.values()), key=len)
    b = max((np.asarray(n.b) for n in nodes.values()), key=lambda t: t.shape[1])
    for m, n in nodes.items():
      if not (np.array_equal(np.asarray(n.a), a[:n.a.shape[0]]) and
              np.array_equal(np.asarray(n.b), b[:, :n.b.shape[1]])):
        raise ValueError(f"{m}: its VeRA basis is not a slice of the others' (adapters from different seeds or "
                         "sizes cannot be exported as one PEFT adapter)")
    return {"base_model.vera_A": a.T, "base_model.vera_B": b.T}

  @classmethod
  def hf_config(cls, nodes, spec):
    ranks = {n.a.shape[-1] for n in nodes.values()}
    options = dict(spec.options) if spec is not None else {}
    return {"peft_type": "VERA", "r": ranks.pop(), "projection_prng_key": options.get("projection_prng_key", 0),
            "save_projection": True, "d_initial": options.get("d_initial", 0.1), "vera_dropout": 0.0,
            "init_weights": True, "bias": "none", "fan_in_fan_out": False}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked, shared=None):
    if not shared or set(shared) != set(cls.hf_shared_names):
      raise ValueError(f"{module}: the adapter file holds no vera_A / vera_B (saved with save_projection=False); "
                       "PEFT regenerates them with torch's generator, which cannot be reproduced here")
    n_in, n_out = kernel_shape(base)[-2:]
    full_a, full_b = shared["base_model.vera_A"], shared["base_model.vera_B"]
    if full_a.shape[1] < n_in or full_b.shape[0] < n_out:
      raise ValueError(f"{module}: vera_A {full_a.shape} / vera_B {full_b.shape} are smaller than the layer "
                       f"({n_in} in, {n_out} out)")
    a = jnp.asarray(shared["base_model.vera_A"][:, :n_in].T, jnp.float32)
    b = jnp.asarray(shared["base_model.vera_B"][:n_out].T, jnp.float32)
    return cls(base, _stack([l["vera_lambda_d"] for l in layers], stacked),
               _stack([l["vera_lambda_b"] for l in layers], stacked), a, b)


def _prepare(spec: AdapterSpec, leaves: dict) -> AdapterSpec:
  """The basis is sized for the largest targeted layer (options `basis_in` / `basis_out` override)."""
  shapes = [kernel_shape(l) for l in leaves.values()]
  return spec.replace(options={"basis_in": max(s[-2] for s in shapes), "basis_out": max(s[-1] for s in shapes),
                               **spec.options})


@register_adapter("vera")
def make_vera(base, spec: AdapterSpec, rng, path: str) -> VeRA:
  """spec.rank = r (PEFT's default is 256); spec.options: `projection_prng_key` (0), `d_initial` (0.1),
  `basis_in` / `basis_out` (the shared basis size; `peft.apply` sets them to the largest targeted layer).
  alpha, init and dropout do not apply."""
  del rng
  if spec.dropout:
    raise ValueError("vera: dropout is not supported (PEFT's vera_dropout); use dropout=0")
  if spec.init != "default":
    raise ValueError(f"vera has no init {spec.init!r}: b = 0, d = d_initial")
  shape = kernel_shape(base)
  n_in, n_out = shape[-2:]
  basis_in, basis_out = spec.options.get("basis_in", n_in), spec.options.get("basis_out", n_out)
  if basis_in < n_in or basis_out < n_out:
    raise ValueError(f"{path}: VeRA basis {basis_in}x{basis_out} is smaller than the layer {n_in}x{n_out}")
  a, b = vera_basis(int(spec.options.get("projection_prng_key", 0)), spec.rank, basis_in, basis_out)
  lead = shape[:-2]
  d = jnp.full(lead + (spec.rank,), spec.options.get("d_initial", 0.1), spec.dtype)
  return VeRA(base, d, jnp.zeros(lead + (n_out,), spec.dtype), a[:n_in], b[:, :n_out])


make_vera.prepare = _prepare
