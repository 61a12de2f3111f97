"""DyLoRA: LoRA trained for every rank at once, so that any rank b <= r_max serves after training.

Each training step draws one rank b ~ U{r_min, ..., r_max} for the whole model and uses the nested factors

    y = x W0 + (alpha / r_max) ((drop(x) A[:, :b] c) (c B[:b])),     c = sqrt(r_max / b)

i.e. the truncated product scaled by r_max / b (the reference scales *each* factor by sqrt(r_max / b):
`dynamic.forward` runs on lora_A and on lora_B; METHODS.md's "product scaled by sqrt(r_max / b)" misreads
it). In "frozen" mode (the reference's training callback, `set_rank(b - 1, frozen=True)`) the first b - 1
ranks are detached, so only the b-th column of A and row of B get a gradient. Without a step key (eval,
`peft.merge`, export) the node uses `eval_rank` (default r_max, where c = 1); `peft.dylora_at_rank(params,
b)` picks another rank after training.

The rank is drawn inside the jitted step from the step's key (`peft.with_dropout_rng` hands every node that
defines `with_step_rng` the same key), and A and B always hold r_max ranks with the unused ones masked, so
the step compiles once whatever b is drawn.

(Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation", EACL; huawei-noah/Efficient-NLP `DyLoRA/loralib/{DyLoRA,layers}.py`, whose
`current_rank` is b - 1.) Init as LoRA (Kaiming-uniform A, B = 0), as the reference.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from peft._core import Adapter, dot, is_adapter
from peft._init import init_factors
from peft._lora import LowRankShape
from peft._node import AdapterSpec, adapter_node, input_dropout, register_adapter, static_field
from peft._quant import float_weight

_SALT = 0x44594C   # folded into the step key, so the rank draw is independent of dropout masks


def truncated(a: jax.Array, b: jax.Array, rank, frozen: bool) -> tuple[jax.Array, jax.Array]:
  """(A[:, :rank] c, c B[:rank]) zero-padded to r_max, c = sqrt(r_max / rank); with `frozen`, ranks below
  `rank` carry no gradient. a [..., in, r], b [..., r, out]; rank broadcasts against the leading axes."""
  r = a.shape[-1]
  idx = jnp.arange(r)
  rank = jnp.asarray(rank)[..., None]                        # [..., 1]
  if frozen:
    newest = idx == rank - 1
    a = jnp.where(newest[..., None, :], a, jax.lax.stop_gradient(a))
    b = jnp.where(newest[..., :, None], b, jax.lax.stop_gradient(b))
  keep = idx < rank
  c = jnp.sqrt(r / rank.astype(jnp.float32))
  return (jnp.where(keep[..., None, :], a, 0) * c[..., None, :].astype(a.dtype),
          jnp.where(keep[..., :, None], b, 0) * c[..., :, None].astype(b.dtype))


@adapter_node
class DyLoRA(LowRankShape, Adapter):
  base: Any                            # [..., in, out] kernel or QuantizedWeight
  a: jax.Array                         # [..., in, r_max]
  b: jax.Array                         # [..., r_max, out]
  rng: Optional[jax.Array] = None      # [..., 2] dropout keys (peft.with_dropout_rng)
  step_rank: Optional[jax.Array] = None  # [...] int32: this step's b (with_step_rng); None: eval_rank
  scale: float = static_field(default=1.0)      # alpha / r_max
  dropout: float = static_field(default=0.0)
  r_min: int = static_field(default=1)
  frozen: bool = static_field(default=True)
  eval_rank: int = static_field(default=0)      # 0: r_max

  trainable_fields = ("a", "b")

  def with_step_rng(self, rng) -> "DyLoRA":
    """The same rank for every node of the model this step: b ~ U{r_min..r_max} from the step key."""
    b = jax.random.randint(jax.random.fold_in(rng, _SALT), (), self.r_min, self.rank + 1)
    return self.replace(step_rank=jnp.broadcast_to(b, self.lead_shape).astype(jnp.int32))

  def _factors(self):
    if self.step_rank is None:
      return truncated(self.a, self.b, self.eval_rank or self.rank, frozen=False)
    return truncated(self.a, self.b, self.step_rank, frozen=self.frozen)

  def dot(self, x):
    a, b = self._factors()
    xd = input_dropout(x, self.dropout, self.rng)
    low = jnp.einsum("...i,ir->...r", xd, a.astype(x.dtype))
    return dot(x, self.base) + self.scale * jnp.einsum("...r,ro->...o", low, b.astype(x.dtype))

  def materialize(self):
    a, b = truncated(self.a, self.b, self.eval_rank or self.rank, frozen=False)
    delta = self.scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return (float_weight(self.base, jnp.float32) + delta).astype(jnp.dtype(self.base.dtype))


def dylora_at_rank(params, rank: int):
  """Every DyLoRA node of `params` evaluated (and merged, exported) at rank `rank`."""
  def one(n):
    if not isinstance(n, DyLoRA):
      return n
    if not 1 <= rank <= n.rank:
      raise ValueError(f"dylora rank must be in [1, {n.rank}], got {rank}")
    return n.replace(eval_rank=int(rank))
  return jax.tree.map(one, params, is_leaf=is_adapter)


@register_adapter("dylora")
def make_dylora(base, spec: AdapterSpec, rng, path: str) -> DyLoRA:
  """`spec.rank` is r_max; options: r_min (1), frozen (True, the reference's training mode), eval_rank
  (r_max)."""
  del path
  opts = dict(spec.options)
  unknown = sorted(set(opts) - {"r_min", "frozen", "eval_rank"})
  if unknown:
    raise ValueError(f"dylora: unknown option(s) {unknown}; valid: r_min, frozen, eval_rank")
  r_min, eval_rank = int(opts.get("r_min", 1)), int(opts.get("eval_rank", spec.rank))
  if not 1 <= r_min <= spec.rank or not 1 <= eval_rank <= spec.rank:
    raise ValueError(f"dylora: need 1 <= r_min, eval_rank <= rank={spec.rank}; got {r_min}, {eval_rank}")
  scale = spec.alpha / spec.rank
  a, b, res = init_factors(spec.init, float_weight(base, jnp.float32), spec.rank, scale, rng)
  if res is not None:
    raise ValueError("dylora: residual inits (pissa, olora) are not supported; use default or gaussian")
  return DyLoRA(base, a.astype(spec.dtype), b.astype(spec.dtype), scale=scale, dropout=spec.dropout,
                r_min=r_min, frozen=bool(opts.get("frozen", True)), eval_rank=eval_rank)
