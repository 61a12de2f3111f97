r"""LoRA-FA: A frozen at its initialisation, B trained on a projected gradient.

Zhang et al., *LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning*
(arXiv 2308.03303); HF PEFT's `peft.optimizers.create_lorafa_optimizer` / `LoraFAOptimizer`, which this
reproduces. With A frozen, the full-gradient step that B alone can best match (least squares over B's
column space) is B's gradient times (A Aᵀ)⁻¹ / s²; in our layout (a = Aᵀ [in, r], b = Bᵀ [r, out]):

.. math::

  g_b' = \tfrac{1}{s^2} (a^T a + \delta I)^{-1} g_b, \qquad g_a' = 0

then Adam on g_b' in the HF "adamw-hf" form PEFT uses,
:math:`b \leftarrow b - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m}{\sqrt{v} + \epsilon}`, followed
by the decoupled decay of the *updated* weight, :math:`b \leftarrow b (1 - \eta\lambda)`. Every other leaf
(a LoRA bias, a non-LoRA leaf) gets the same Adam on its raw gradient, as PEFT's fallback. The `a` factors
get a zero update and no optimizer state (`set_to_zero`).

Differences from PEFT, each with how to restore it:
* PEFT computes g_b' under bf16 autocast when the machine supports bf16; we compute in float32 (the parity
  test runs PEFT with autocast off).
* PEFT's A has `requires_grad=False`, so its gradient never exists; here jax still differentiates the
  trainable `a` (for the logged gradient norm and the global-norm clip, which therefore include A's
  gradient: set `config.optim.grad_clip_norm=0` for PEFT's unclipped step).
* PEFT uses `pinv`; we solve the regularised system, equal for a full-rank a (always, for a random init).
Select with `config.optim.name=lorafa`; options are `config.optim.lorafa.*` (PEFT's defaults: eps 1e-6).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _projector as pj
from optim._registry import register_optimizer
from peft import LoRA


def _is_lora(x) -> bool:
  return isinstance(x, LoRA)


def lorafa_gradients(updates: optax.Updates, params: optax.Params, delta: float = 1e-8) -> optax.Updates:
  """`updates` with every LoRA node's g_b replaced by (aᵀa + delta I)⁻¹ g_b / s² and g_a by 0."""
  def fix(g, p):
    if not _is_lora(p) or not all(isinstance(x, jax.Array) for x in (g.a, g.b, p.a, p.b)):
      return g
    a = p.a.astype(jnp.float32)
    r = a.shape[-1]
    gram = jnp.swapaxes(a, -1, -2) @ a + delta * jnp.eye(r, dtype=jnp.float32)
    gb = jnp.linalg.solve(gram, g.b.astype(jnp.float32)) / (p.scale ** 2)
    return g.replace(a=jnp.zeros_like(g.a), b=gb.astype(g.b.dtype))
  return jax.tree.map(fix, updates, params, is_leaf=_is_lora)


def lorafa_labels(params) -> optax.Params:
  """"frozen" on the `a` factor of every LoRA node, "adam" elsewhere."""
  def label(x):
    if _is_lora(x):
      labels = jax.tree.map(lambda _: "adam", x)
      return labels.replace(a="frozen") if isinstance(x.a, jax.Array) else labels
    return "adam"
  return jax.tree.map(label, params, is_leaf=_is_lora)


class ScaleByHfAdamState(NamedTuple):
  count: jax.Array   # (), int32
  mu: optax.Updates
  nu: optax.Updates


def scale_by_hf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps): transformers' legacy AdamW, which PEFT's
  LoraFAOptimizer copies (eps outside the bias correction, unlike optax.adam)."""
  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return ScaleByHfAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    moments = jax.tree.map(lambda g, m, v: pj.update_moments(g.astype(jnp.float32), m, v, b1, b2),
                           updates, state.mu, state.nu)
    mu = jax.tree.map(lambda _, mv: mv[0], updates, moments)
    nu = jax.tree.map(lambda _, mv: mv[1], updates, moments)
    out = jax.tree.map(lambda g, m, v: pj.hf_adam(m, v, count, b1, b2, eps).astype(g.dtype), updates, mu, nu)
    return out, ScaleByHfAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lorafa(delta: float = 1e-8) -> optax.GradientTransformation:
  """The projection alone (stateless); `update` needs `params` (the LoRA factors)."""
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lorafa needs params (the LoRA factors) in update")
    return lorafa_gradients(updates, params, delta), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@register_optimizer("lorafa")
def lorafa(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: float = 0.0, delta: float = 1e-8) -> optax.GradientTransformation:
  """LoRA-FA: projected g_b, HF Adam, decay of the updated weight; `a` frozen (no state).

  Args:
    learning_rate: eta, a float or a schedule.
    b1, b2, eps, weight_decay: LoraFAOptimizer's (PEFT's defaults).
    delta: the ridge of (aᵀa + delta I)⁻¹ (PEFT's 1e-8).
  """
  adam = optax.chain(scale_by_hf_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate),
                     pj.decay_updated_weights(learning_rate, weight_decay))
  return optax.chain(scale_by_lorafa(delta),
                     optax.multi_transform({"adam": adam, "frozen": optax.set_to_zero()}, lorafa_labels))
