r"""LoRA-Pro: LoRA gradients corrected so that the LoRA step best matches the full fine-tuning step.

Wang et al., *LoRA-Pro: Are Low-Rank Adapters Properly Optimized?*, ICLR 2025 (arXiv 2407.18242);
reference code `mrflogs/LoRA-Pro: peta/optim_efficient_adamw_only.py`.

In the paper's notation W = W0 + s B A with B [m, r], A [r, n]. One SGD step on (A, B) moves W by
-lr times the *equivalent gradient* g̃ = s (B g_A + g_B A) (to first order), where the LoRA gradients are
g_A = s Bᵀ g and g_B = s g Aᵀ for the full gradient g. LoRA-Pro replaces (g_A, g_B) by the minimisers of
‖s (B g_A' + g_B' A) - g‖_F, which need g only through g_A and g_B:

.. math::

  g_A' = \tfrac{1}{s^2} (B^T B)^{-1} g_A + X A, \qquad
  g_B' = \tfrac{1}{s^2} \big(I - B (B^T B)^{-1} B^T\big) g_B (A A^T)^{-1} - B X,

so that g̃' = P_B g + (I - P_B) g P_A (the projection of g onto {B U + V A}) for every r x r matrix X.
The paper picks X to keep (g_A', g_B') closest to (g_A, g_B), i.e. the minimiser of
‖g_A' - g_A‖² + ‖g_B' - g_B‖², which solves the Sylvester equation

.. math::

  B^T B \, X + X \, A A^T = -\tfrac{1}{s^2} (B^T B)^{-1} g_A A^T

(setting its derivative to zero: the s Bᵀ g Aᵀ terms of g_A Aᵀ and Bᵀ g_B cancel). `x_mode="zero"` takes X = 0.

**Our layout.** Kernels are [in, out] and the LoRA delta is s a b with a [in, r], b [r, out], so B = bᵀ and
A = aᵀ. With M_a = aᵀa, M_b = b bᵀ (both r x r) and Y = Xᵀ the same formulas read

.. math::

  g_a' = \tfrac{1}{s^2} g_a M_b^{-1} + a Y, \qquad
  g_b' = \tfrac{1}{s^2} M_a^{-1} g_b (I - b^T M_b^{-1} b) - Y b, \qquad
  M_a Y + Y M_b = -\tfrac{1}{s^2} a^T g_a M_b^{-1}.

Both Gram matrices are symmetric positive semi-definite: we eigendecompose them once (float32, batched over
stacked layers), regularise the inverses as (M + eps I)^{-1} (the reference's `delta`, eigenvalues clipped at
0 first), and solve the Sylvester equation in the two eigenbases, Y = U [(Uᵀ C V) / (λ_i + σ_j)] Vᵀ, which is
real and needs no general eigensolver. At LoRA's default init b = 0: g_a = 0 and Y = 0, so the step is
g_b' = M_a⁻¹ g_b / s² and stays finite.

The corrected gradients then go through Adam (`optimizer="adam"`, optax's eps placement, as torch AdamW in
the reference) or SGD with optional momentum (`optimizer="sgd"`). Leaves that are not the `a`/`b` pair of a
`LoRA` node (a trained bias, DoRA's magnitude, ...) get the same inner optimizer on their raw gradient.
Left out: the paper's full-AdamW variant (`peta/optim.py`), which maps the Adam moments into the equivalent
full-gradient space each step; like the reference's memory-efficient optimizer we run Adam on (g_a', g_b')
directly. `lora_pro` adds decoupled weight decay and the learning rate.

Usage::

  tx = lora_pro(1e-3, weight_decay=0.0)
  updates, state = tx.update(grads, state, params)   # params: the trainable tree (LoRA nodes with a, b)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim._registry import register_optimizer
from peft import LoRA

X_MODES = ("sylvester", "zero")
OPTIMIZERS = ("adam", "sgd")


class ScaleByLoraProState(NamedTuple):
  inner: optax.OptState   # the inner optimizer's state (Adam moments per leaf, or SGD's trace)


def _sym_eig(m: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(eigenvalues clipped at 0 plus eps, eigenvectors) of symmetric [..., r, r] matrices."""
  w, v = jnp.linalg.eigh(m)
  return jnp.maximum(w, 0.0) + eps, v


def _apply_inv(w, v, x, side: str) -> jax.Array:
  """(M + eps I)^{-1} x (side="left") or x (M + eps I)^{-1} (side="right"), M = v diag(w) vᵀ."""
  vt = jnp.swapaxes(v, -1, -2)
  if side == "left":
    return v @ ((vt @ x) / w[..., :, None])
  return ((x @ v) / w[..., None, :]) @ vt


def corrected_lora_grads(a: jax.Array, b: jax.Array, ga: jax.Array, gb: jax.Array, scale: float,
                         eps: float = 1e-8, x_mode: str = "sylvester") -> tuple[jax.Array, jax.Array]:
  """LoRA-Pro's (g_a', g_b') for a [..., in, r], b [..., r, out] and their gradients (module docstring).

  Computed in float32 (float64 if given) and returned in the gradients' dtypes; leading axes (stacked layers) broadcast.
  """
  if x_mode not in X_MODES:
    raise ValueError(f"x_mode={x_mode!r}; valid: {', '.join(X_MODES)}")
  dt_a, dt_b = ga.dtype, gb.dtype
  ct = jnp.promote_types(jnp.result_type(a, b, ga, gb), jnp.float32)   # bf16 -> f32; f64 stays
  a, b, ga, gb = (x.astype(ct) for x in (a, b, ga, gb))
  bt = jnp.swapaxes(b, -1, -2)
  inv_s2 = 1.0 / (scale * scale)
  wa, va = _sym_eig(jnp.swapaxes(a, -1, -2) @ a, eps)   # M_a = aᵀ a   [.., r, r]
  wb, vb = _sym_eig(b @ bt, eps)                        # M_b = b bᵀ   [.., r, r]

  ga_mb = _apply_inv(wb, vb, ga, "right")               # g_a M_b⁻¹    [.., in, r]
  # (I - bᵀ M_b⁻¹ b) projects the rows of g_b off the row space of b.
  gb_perp = gb - (gb @ _apply_inv(wb, vb, bt, "right")) @ b
  new_a = inv_s2 * ga_mb
  new_b = inv_s2 * _apply_inv(wa, va, gb_perp, "left")
  if x_mode == "sylvester":
    c = -inv_s2 * (jnp.swapaxes(a, -1, -2) @ ga_mb)     # M_a Y + Y M_b = C
    c_eig = jnp.swapaxes(va, -1, -2) @ c @ vb
    y = va @ (c_eig / (wa[..., :, None] + wb[..., None, :])) @ jnp.swapaxes(vb, -1, -2)
    new_a = new_a + a @ y
    new_b = new_b - y @ b
  return new_a.astype(dt_a), new_b.astype(dt_b)


def _is_lora(x) -> bool:
  return isinstance(x, LoRA)


def lora_pro_gradients(updates: optax.Updates, params: optax.Params, eps: float = 1e-8,
                       x_mode: str = "sylvester") -> optax.Updates:
  """`updates` with the (a, b) gradients of every LoRA node of `params` replaced by LoRA-Pro's."""
  def fix(g, p):
    if not _is_lora(p) or not all(isinstance(x, jax.Array) for x in (g.a, g.b, p.a, p.b)):
      return g
    ga, gb = corrected_lora_grads(p.a, p.b, g.a, g.b, p.scale, eps, x_mode)
    return g.replace(a=ga, b=gb)
  return jax.tree.map(fix, updates, params, is_leaf=_is_lora)


def _inner(optimizer: str, b1: float, b2: float, eps: float, momentum: Optional[float]):
  if optimizer == "adam":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.trace(decay=momentum) if momentum else optax.identity()


def scale_by_lora_pro(optimizer: str = "adam", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                      momentum: Optional[float] = None, inverse_eps: float = 1e-8,
                      x_mode: str = "sylvester") -> optax.GradientTransformation:
  """LoRA-Pro's direction (module docstring); multiply by -lr outside. `update` needs `params`.

  Args:
    optimizer: "adam" (the paper's) or "sgd" on the corrected gradients.
    b1, b2, eps: Adam's (optax placement: m̂ / (sqrt(v̂) + eps)).
    momentum: SGD's heavy-ball momentum (None or 0: plain SGD); ignored by Adam.
    inverse_eps: eps of the regularised inverses (M + eps I)^{-1} of the Gram matrices.
    x_mode: "sylvester" (the paper's X, closest to the plain LoRA gradients) or "zero".
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
  if x_mode not in X_MODES:
    raise ValueError(f"x_mode={x_mode!r}; valid: {', '.join(X_MODES)}")
  if inverse_eps < 0:
    raise ValueError(f"inverse_eps must be >= 0, got {inverse_eps}")
  inner = _inner(optimizer, b1, b2, eps, momentum)

  def init_fn(params):
    return ScaleByLoraProState(inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lora_pro needs params (the LoRA factors) in update")
    fixed = lora_pro_gradients(updates, params, inverse_eps, x_mode)
    out, inner_state = inner.update(fixed, state.inner, params)
    return out, ScaleByLoraProState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


@register_optimizer("lora_pro")
def lora_pro(learning_rate: optax.ScalarOrSchedule, optimizer: str = "adam", b1: float = 0.9,
             b2: float = 0.999, eps: float = 1e-8, momentum: Optional[float] = None,
             inverse_eps: float = 1e-8, x_mode: str = "sylvester", weight_decay: float = 0.0,
             mask: Optional[Any] = None) -> optax.GradientTransformation:
  """LoRA-Pro with decoupled weight decay (as torch AdamW in the reference) and the learning rate.

  `mask` is the weight-decay mask (bool tree or params -> bool tree), as in `optax.adamw`.
  """
  return optax.chain(
      scale_by_lora_pro(optimizer, b1, b2, eps, momentum, inverse_eps, x_mode),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))
