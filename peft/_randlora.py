"""RandLoRA: a full-rank update from shared frozen random low-rank bases; each layer trains two diagonals.

    ΔW = s · Σ_{n=1..N} B_n Λ_n A Γ_n,      N = ceil(min(in, out) / r),   s = alpha / r

(Albert et al., ICLR 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models"; PEFT
`tuners/randlora`.) A [r, m] (m = min(in, out)) and B_n [M, r] (M = max(in, out)) are random and frozen;
Λ_n = diag(lambda[:, n]) [r] and Γ_n = diag(gamma[n]) [m] train. The trained diagonals act on the smaller
side (A), so a layer trains N (r + m) numbers (`lambda` [r, N], `gamma` [N, m]), and since N r ≥ m the
update can reach full rank. For in ≤ out the product is read as x -> x (Σ ...)ᵀ, i.e. A sits on the input
side; for in > out on the output side (PEFT's layout, which keeps the trained side the small one).

PEFT builds the update as two flattened matrices: scaled A [r, N, m] flattened over (rank, basis) and B
[M, N, r] flattened over (basis, rank), so entry p of one meets entry p of the other. Both are iid random,
so this is the same family of updates; we keep that pairing so the same basis tensors give PEFT's ΔW.

The basis is drawn once for the largest targeted layer (A_full [r, m_max], B_full [M_max, N_max, r], with
PEFT's (M_max, m_max) = max / min of the element-wise largest (out, in)); a layer uses A_full[:, :m] and
B_full[:M, :N]. Values are uniform with unit variance, sqrt(3) (2u - 1), rounded to bfloat16 as PEFT keeps
its basis (and then every value survives PEFT's bfloat16 buffer exactly). They are regenerated bit-exactly
from `projection_prng_key` (`randlora_basis`), never trained, never in a checkpoint of the trainable tree.
PEFT's init: lambda = 0 (the adapter starts as the identity), gamma = 1 / max(N, m).

Differences from PEFT: PEFT draws with torch's CPU generator, which JAX cannot reproduce, and divides by the
sample standard deviation; here the same seed gives another basis of the same distribution, scaled by the
exact standard deviation (a single rounding, so the bits are the same under any jit). Exports carry the
basis (`save_projection=True`) and an import uses the basis in its file; a file saved with
`save_projection=False` cannot be imported. `sparse` / `very_sparse` bases are not drawn here (an import of
such a file works, its basis is in the file). `randlora_dropout` is not supported (dropout must be 0).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._lora import _stack, base_dtype
from peft._node import AdapterSpec, adapter_node, register_adapter, register_hf_format, static_field
from peft._quant import float_weight
from peft._vera import kernel_shape


def n_bases(n_min: int, rank: int) -> int:
  """N = ceil(min(in, out) / r): enough rank-r bases to reach full rank."""
  return -(-n_min // rank)


def randlora_basis(seed: int, rank: int, n_min: int, n_max: int) -> tuple[jax.Array, jax.Array]:
  """(A [r, n_min], B [n_max, N, r]) bfloat16 with unit variance. `sqrt(3) * (2u - 1)` rounds once in float32
  (2u - 1 is exact), then once to bfloat16, so the bits are the same under any jit. One threefry draw."""
  n = n_bases(n_min, rank)
  u = jax.random.uniform(jax.random.PRNGKey(seed), (rank * n_min + n_max * n * rank,), jnp.float32)   # [0, 1)
  unit = (jnp.float32(math.sqrt(3.0)) * (2.0 * u - 1.0)).astype(jnp.bfloat16)
  return unit[:rank * n_min].reshape(rank, n_min), unit[rank * n_min:].reshape(n_max, n, rank)


@register_hf_format
@adapter_node
class RandLoRA(Adapter):
  base: Any                          # [..., in, out] kernel or QuantizedWeight
  lam: jax.Array                     # [..., r, N]   trained (PEFT's randlora_lambda)
  gamma: jax.Array                   # [..., N, m]   trained (PEFT's randlora_gamma)
  a: Optional[jax.Array] = None      # [r, m_max]          frozen A_full, shared (no layer axis)
  b: Optional[jax.Array] = None      # [M_max, N_max, r]   frozen B_full, shared; this layer reads [:M, :N]
  scale: float = static_field(default=1.0)   # alpha / r

  trainable_fields = ("lam", "gamma")
  hf_peft_type = "RANDLORA"

  # The shared basis has no layer axis: the scan slices the rest and closes over it.
  def scan_parts(self):
    return self.replace(a=None, b=None), (self.a, self.b)

  def scan_bind(self, closed):
    return self.replace(a=closed[0], b=closed[1])

  def _factors(self, dtype):
    """(Σ-side factors) scaled A flattened over (rank, basis) [..., rN, m], B flattened over (basis, rank)
    [M, Nr]. Weight-sized, independent of the batch (as PEFT's)."""
    r, n = self.lam.shape[-2:]
    lead = self.lam.shape[:-2]
    n_in, n_out = kernel_shape(self.base)[-2:]
    m, big = min(n_in, n_out), max(n_in, n_out)
    a = (self.lam.astype(dtype)[..., :, :, None] * self.a[:, :m].astype(dtype)[:, None, :]
         * self.gamma.astype(dtype)[..., None, :, :])                          # Λ_n A Γ_n  [..., r, N, m]
    return a.reshape(lead + (r * n, m)), self.b[:big, :n].astype(dtype).reshape(big, n * r)

  def _input_is_small(self) -> bool:
    n_in, n_out = kernel_shape(self.base)[-2:]
    return n_in <= n_out

  def dot(self, x):
    a, b = self._factors(x.dtype)
    s = jnp.asarray(self.scale, x.dtype)
    if self._input_is_small():        # ΔW = (B A)ᵀ: x -> x Aᵀ Bᵀ
      up = jnp.einsum("...p,op->...o", jnp.einsum("...i,pi->...p", x, a), b)
    else:                             # ΔW = B A:    x -> x B A
      up = jnp.einsum("...p,po->...o", jnp.einsum("...i,ip->...p", x, b), a)
    return dot(x, self.base) + up * s

  def delta(self) -> jax.Array:
    """s Σ_n B_n Λ_n A Γ_n in our [..., in, out] layout, float32."""
    a, b = self._factors(jnp.float32)
    if self._input_is_small():
      return self.scale * jnp.einsum("...pi,op->...io", a, b)
    return self.scale * jnp.einsum("ip,...po->...io", b, a)

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(base_dtype(self.base))

  # ---- HF PEFT format (peft/_export.py) ---------------------------------------------------------------
  # PEFT's state dict also holds every module's view of the shared basis (`<module>.randlora_A` / `_B`).
  hf_tensor_names = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
  hf_shared_names = ("base_model.randlora_A", "base_model.randlora_B")

  @classmethod
  def hf_accepts(cls, config) -> bool:
    return True

  def hf_tensors(self):
    return {"randlora_lambda": np.asarray(self.lam), "randlora_gamma": np.asarray(self.gamma)}

  @classmethod
  def hf_shared(cls, nodes: dict) -> dict:
    """PEFT's randlora_A [r, 1, m_max] and randlora_B [M_max, N_max, r]: the one basis every node holds."""
    f32 = lambda t: np.asarray(t, np.float32)
    first = next(iter(nodes.values()))
    a, b = f32(first.a), f32(first.b)
    for m, n in nodes.items():
      if not (n.a is first.a or np.array_equal(f32(n.a), a)) or not (n.b is first.b or np.array_equal(f32(n.b), b)):
        raise ValueError(f"{m}: its RandLoRA basis differs from the others' (adapters from different seeds or "
                         "target sets cannot be exported as one PEFT adapter)")
    shared = {"base_model.randlora_A": a[:, None, :], "base_model.randlora_B": b}
    # PEFT's state dict repeats the basis under every adapted module (`<module>.randlora_A` / `_B`); write
    # them too, so that the file is what `save_pretrained` writes. `short` is "self_attn.q_proj" or "lm_head".
    for short, n in nodes.items():
      layers = [None] if n.lam.ndim == 2 else range(n.lam.shape[0])
      for i in layers:
        module = "lm_head" if i is None else f"model.layers.{i}.{short}"
        shared.update({f"base_model.model.{module}.randlora_{k}": v for k, v in zip("AB", shared.values())})
    return shared

  @classmethod
  def hf_config(cls, nodes, spec):
    ranks = {n.a.shape[0] for n in nodes.values()}
    scales = {n.scale for n in nodes.values()}
    if len(ranks) != 1 or len(scales) != 1:
      raise ValueError(f"one rank and one alpha per PEFT RandLoRA adapter, got ranks {ranks}, scales {scales}")
    r = ranks.pop()
    alpha = scales.pop() * r
    options = dict(spec.options) if spec is not None else {}
    return {"peft_type": "RANDLORA", "r": r, "randlora_alpha": alpha,
            "projection_prng_key": options.get("projection_prng_key", 0), "save_projection": True,
            "sparse": False, "very_sparse": False, "randlora_dropout": 0.0, "init_weights": True,
            "bias": "none", "fan_in_fan_out": False}

  @classmethod
  def from_hf(cls, base, layers, config, module, stacked, shared=None):
    if (not shared or set(shared) != set(cls.hf_shared_names)) and "randlora_A" in layers[0]:
      shared = {"base_model.randlora_A": layers[0]["randlora_A"], "base_model.randlora_B": layers[0]["randlora_B"]}
    if not shared or set(shared) != set(cls.hf_shared_names):
      raise ValueError(f"{module}: the adapter file holds no randlora_A / randlora_B (saved with "
                       "save_projection=False); PEFT regenerates them with torch's generator, which cannot be "
                       "reproduced here")
    n_in, n_out = kernel_shape(base)[-2:]
    m, big, r = min(n_in, n_out), max(n_in, n_out), int(config["r"])
    n = n_bases(m, r)
    full_a, full_b = np.asarray(shared["base_model.randlora_A"]), np.asarray(shared["base_model.randlora_B"])
    if full_a.shape[0] != r or full_a.shape[2] < m or full_b.shape[0] < big or full_b.shape[1] < n:
      raise ValueError(f"{module}: randlora_A {full_a.shape} / randlora_B {full_b.shape} do not cover the layer "
                       f"({n_in} in, {n_out} out, r={r})")
    for l in layers:   # every module's view must be the one shared basis
      if "randlora_A" in l and not (np.array_equal(l["randlora_A"], full_a) and np.array_equal(l["randlora_B"], full_b)):
        raise ValueError(f"{module}: its randlora_A / randlora_B differ from the adapter's shared basis")
    a, b = _shared_basis(full_a, full_b)
    return cls(base, _stack([l["randlora_lambda"] for l in layers], stacked),
               _stack([l["randlora_gamma"] for l in layers], stacked), a, b,
               scale=float(config.get("randlora_alpha", 640)) / r)


_DRAWN: dict = {}


def _cached_basis(seed, rank, n_min, n_max):
  """One pair of arrays per (seed, size) for all the nodes of an apply: they share it rather than each holding
  a copy. Only concrete arrays are kept (an apply under jit or eval_shape draws afresh)."""
  key = (seed, rank, n_min, n_max)
  if key in _DRAWN and not any(t.is_deleted() for t in _DRAWN[key]):   # a donated step may have freed it
    return _DRAWN[key]
  basis = randlora_basis(seed, rank, n_min, n_max)
  if not any(isinstance(t, jax.core.Tracer) for t in basis):
    _DRAWN.clear()
    _DRAWN[key] = basis
  return basis


_IMPORTED: dict = {}


def _shared_basis(full_a, full_b):
  """The file's basis as one pair of arrays for every module of one import (keyed by the file's bytes)."""
  key = (full_a.tobytes(), full_b.tobytes())
  if key not in _IMPORTED or any(t.is_deleted() for t in _IMPORTED[key]):
    _IMPORTED.clear()
    _IMPORTED[key] = (jnp.asarray(full_a[:, 0], jnp.float32), jnp.asarray(full_b, jnp.float32))
  return _IMPORTED[key]


def _prepare(spec: AdapterSpec, leaves: dict) -> AdapterSpec:
  """The basis is sized as PEFT's: the element-wise largest (in, out) of the targeted layers gives
  m_max = its min and M_max = its max (options `basis_min` / `basis_max` override)."""
  shapes = [kernel_shape(l)[-2:] for l in leaves.values()]
  largest = (max(s[0] for s in shapes), max(s[1] for s in shapes))
  return spec.replace(options={"basis_min": min(largest), "basis_max": max(largest), **spec.options})


@register_adapter("randlora")
def make_randlora(base, spec: AdapterSpec, rng, path: str) -> RandLoRA:
  """spec.rank = r (PEFT's default 32), spec.alpha (PEFT's randlora_alpha, default 640: s = alpha / r);
  spec.options: `projection_prng_key` (0), `basis_min` / `basis_max` (the shared basis size; `peft.apply`
  sets them from the targeted layers). init and dropout do not apply."""
  del rng
  if spec.dropout:
    raise ValueError("randlora: dropout is not supported (PEFT's randlora_dropout); use dropout=0")
  if spec.init != "default":
    raise ValueError(f"randlora has no init {spec.init!r}: lambda = 0, gamma = 1 / max(N, min(in, out))")
  if spec.use_rslora:
    raise ValueError("randlora: use_rslora does not apply (s = alpha / r)")
  shape = kernel_shape(base)
  n_in, n_out = shape[-2:]
  m, big = min(n_in, n_out), max(n_in, n_out)
  basis_min, basis_max = spec.options.get("basis_min", m), spec.options.get("basis_max", big)
  if basis_min < m or basis_max < big:
    raise ValueError(f"{path}: RandLoRA basis {basis_min}x{basis_max} is smaller than the layer {n_in}x{n_out}")
  a, b = _cached_basis(int(spec.options.get("projection_prng_key", 0)), spec.rank, basis_min, basis_max)
  n, lead = n_bases(m, spec.rank), shape[:-2]
  lam = jnp.zeros(lead + (spec.rank, n), spec.dtype)
  gamma = jnp.full(lead + (n, m), 1.0 / max(n, m), spec.dtype)
  return RandLoRA(base, lam, gamma, a, b, scale=spec.alpha / spec.rank)


make_randlora.prepare = _prepare
