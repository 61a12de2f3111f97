"""KaSA: knowledge-aware singular-value adaptation. The base loses its r smallest singular components, and the
update is an SVD-form LoRA with a trained diagonal of singular values.

    W = U S V^T,   W_base = U[:, :k-r] S[:k-r] V[:, :k-r]^T      (k = min(in, out): the r smallest dropped)
    y = x W_base + s ((drop(x) A) * d) B,     A [in, r] (ΔV), d [r] (ΔΣ), B [r, out] (ΔU^T),  s = alpha / r

and two regularisers added to the loss (paper Eq. 9-11, PEFT 0.21's `_kasa_layer_regularization_loss`):

    R = sum over matrices of  beta ||d||_2^2 + gamma (||B B^T - I||_F + ||A^T A - I||_F)

(Frobenius norms, not squared, as the paper and PEFT write them; a plain sum over matrices, as PEFT's
`_get_kasa_loss`). Defaults beta = 1e-4, gamma = 1e-3 (PEFT's `KasaConfig`, the reference GLUE values).

(Wang et al., 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models",
arXiv:2412.06071; `juyongjiang/KaSA`; PEFT 0.21 `tuners/lora/variants.py: KasaLinearVariant`.) Init as PEFT:
A Kaiming-uniform (LoRA's default), B = 0, d ~ N(0, 1), so the output at init is the *truncated* base's.

The truncation needs only W, so it is this adapter's own init (the factory), not a data-driven init: it runs
in `peft.apply` on every matrix (float32 SVD, vmapped over stacked layers) and the node stores the truncated
base in the base's storage (`like_base`), as PiSSA's residual. It is deterministic in W, so a resumed run
rebuilds the same frozen tree. `frozen_base()` is the truncated weight (PEFT's disabled adapter gives the
same), so the reference model of a preference loss sees the truncated base.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import Adapter, dot
from peft._init import init_factors
from peft._lora import LoRA, LowRankShape
from peft._node import (AdapterSpec, adapter_node, input_dropout, options_with_defaults, register_adapter,
                        register_hf_format, static_field)
from peft._quant import float_weight, like_base

KASA_OPTIONS = dict(beta=1e-4, gamma=1e-3)


def kasa_options(given) -> dict:
  """`config.peft.options` of a KaSA run over PEFT's `KasaConfig` defaults; an unknown key raises."""
  return options_with_defaults("kasa", KASA_OPTIONS, given)


def truncate_smallest(w: jax.Array, rank: int) -> jax.Array:
  """W [..., in, out] without its `rank` smallest singular components (float32 SVD)."""
  k = min(w.shape[-2:])
  if rank >= k:
    raise ValueError(f"KaSA needs r < min(in, out) = {k} (at least one component of W kept), got r = {rank}")
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  keep = k - rank
  return jnp.einsum("...ir,...r,...ro->...io", u[..., :keep], s[..., :keep], vt[..., :keep, :])


def kasa_penalty(a: jax.Array, d: jax.Array, b: jax.Array, beta: float, gamma: float) -> jax.Array:
  """beta sum d^2 + gamma (||B B^T - I||_F + ||A^T A - I||_F), summed over the leading (layer) axes."""
  r = d.shape[-1]
  eye = jnp.eye(r, dtype=jnp.float32)
  a, d, b = a.astype(jnp.float32), d.astype(jnp.float32), b.astype(jnp.float32)
  fro = lambda m: jnp.sqrt(jnp.sum(m * m, axis=(-2, -1)))
  gram_b = jnp.einsum("...ro,...so->...rs", b, b) - eye      # PEFT's lora_B^T lora_B = ΔU^T ΔU
  gram_a = jnp.einsum("...ir,...is->...rs", a, a) - eye      # PEFT's lora_A lora_A^T = ΔV^T ΔV
  return jnp.sum(beta * jnp.sum(d * d, -1) + gamma * (fro(gram_b) + fro(gram_a)))


@register_hf_format
@adapter_node
class KaSA(LowRankShape, Adapter):
  base: Any                         # [..., in, out] the truncated kernel (or a QuantizedWeight of it)
  a: jax.Array                      # [..., in, r]  PEFT's lora_A^T (ΔV)
  d: jax.Array                      # [..., r]      PEFT's lora_diag (ΔΣ)
  b: jax.Array                      # [..., r, out] PEFT's lora_B^T (ΔU^T)
  rng: Optional[jax.Array] = None   # [..., 2] dropout keys (peft.with_dropout_rng)
  scale: float = static_field(default=1.0)
  dropout: float = static_field(default=0.0)
  beta: float = static_field(default=1e-4)
  gamma: float = static_field(default=1e-3)

  trainable_fields = ("a", "d", "b")
  hf_peft_type = "LORA"                                    # LoraConfig(kasa_config=KasaConfig(...))
  hf_tensor_names = ("lora_A.weight", "lora_B.weight", "lora_diag")

  def dot(self, x):
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, self.a.astype(x.dtype)) * self.d.astype(x.dtype)
    return dot(x, self.base) + jnp.einsum("...r,ro->...o", low, self.b.astype(x.dtype)) * self.scale

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """s A diag(d) B [..., in, out]."""
    ad = self.a.astype(dtype) * self.d.astype(dtype)[..., None, :]
    return self.scale * jnp.einsum("...ir,...ro->...io", ad, self.b.astype(dtype))

  def materialize(self):
    return (float_weight(self.base, jnp.float32) + self.delta()).astype(jnp.dtype(self.base.dtype))

  def regularizer(self):
    if not (self.beta or self.gamma):
      return None
    return {"kasa": (kasa_penalty(self.a, self.d, self.b, self.beta, self.gamma), 0)}   # count 0: a plain sum

  # ---- HF PEFT format (peft/_export.py): LoRA's tensors and config plus lora_diag and kasa_config. PEFT
  # truncates the base itself when it loads the adapter, so the export belongs on the original model, and
  # `from_hf` truncates the (original) base it is given. ------------------------------------------------
  @classmethod
  def hf_accepts(cls, config) -> bool:
    return bool(config.get("kasa_config"))

  def hf_tensors(self) -> dict[str, np.ndarray]:
    return {"lora_A.weight": np.asarray(self.a).T, "lora_B.weight": np.asarray(self.b).T,
            "lora_diag": np.asarray(self.d)}

  @classmethod
  def hf_config(cls, nodes: dict, spec: Optional[AdapterSpec]) -> dict:
    pairs = {(n.beta, n.gamma) for n in nodes.values()}
    if len(pairs) != 1:
      raise ValueError(f"PEFT's kasa_config is one (beta, gamma) for the whole adapter, got {sorted(pairs)}")
    beta, gamma = pairs.pop()
    return {**LoRA.hf_config(nodes, spec), "kasa_config": {"beta": beta, "gamma": gamma}}

  @classmethod
  def from_hf(cls, base, layers: list[dict], config, module: str, stacked: bool):
    stack = lambda xs: jnp.asarray(np.stack(xs) if stacked else xs[0], jnp.float32)
    a = stack([l["lora_A.weight"].T for l in layers])
    b = stack([l["lora_B.weight"].T for l in layers])
    d = stack([l["lora_diag"] for l in layers])
    r = a.shape[-1]
    kasa = config["kasa_config"]
    return cls(like_base(base, truncate_smallest(float_weight(base, jnp.float32), r)), a, d, b,
               scale=LoRA.hf_scale(config, module, r), dropout=float(config.get("lora_dropout", 0.0)),
               beta=float(kasa.get("beta", 1e-4)), gamma=float(kasa.get("gamma", 1e-3)))


@register_adapter("kasa")
def make_kasa(base, spec: AdapterSpec, rng, path: str) -> KaSA:
  """rank r: r smallest components of W dropped, r trained singular directions; options beta, gamma."""
  del path
  opts = kasa_options(spec.options)
  if spec.init != "default":
    raise ValueError(f"kasa: init {spec.init!r} is not supported (KaSA has its own SVD init); use default")
  w = float_weight(base, jnp.float32)
  k_ab, k_d = jax.random.split(rng)
  a, b, _ = init_factors("default", w, spec.rank, spec.scale, k_ab)       # Kaiming-uniform A, B = 0
  d = jax.random.normal(k_d, w.shape[:-2] + (spec.rank,), jnp.float32)
  truncated = truncate_smallest(w, spec.rank)
  return KaSA(like_base(base, truncated), a.astype(spec.dtype), d.astype(spec.dtype), b.astype(spec.dtype),
              scale=spec.scale, dropout=spec.dropout, beta=float(opts["beta"]), gamma=float(opts["gamma"]))

