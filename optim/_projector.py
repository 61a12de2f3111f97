r"""Projection pieces shared by the projected optimizers (GaLore, Fira, FRUGAL).

**Layout.** Our kernels are `[in, out]`; PyTorch's `nn.Linear.weight` is `[out, in]`. Projection types are
named on the torch matrix :math:`G = g^\top` (m = out rows, n = in columns), so a galore-torch recipe
ports unchanged. With :math:`g = U S V^\top` the SVD of our gradient (so torch's U is our V):

  ============  ===================  ==========================  ===============================
  proj_type     reduces              torch                       ours (g is [in, out])
  ============  ===================  ==========================  ===============================
  right         n (the inputs)       R = G Vh_r^T      [m, r]    R = U_r^T g        [r, out]  "in"
  left          m (the outputs)      R = U_r^T G       [r, n]    R = g V_r          [in, r]   "out"
  full          both                 R = U_r^T G Vh_r^T [r, r]   R = U_r^T g V_r    [r, r]    "both"
  std           right if m >= n else left (the smaller side: moments are r x max(m, n))
  reverse_std   left if m >= n else right (the larger side: moments are r x min(m, n); optax's choice)
  ============  ===================  ==========================  ===============================

and the way back is `U_r N`, `N V_r^T`, `U_r N V_r^T`. Every leaf is a matrix or a stack of matrices:
the trailing two axes are `[in, out]` and leading axes (the decoder's stacked layers `[L, in, out]`) are
batch axes, each slice with its own projector, as each layer is its own torch parameter.

**Signs.** Singular vectors are defined up to sign, and LAPACK builds differ. A projector refresh keeps
the Adam moments, which then mix the old and the new basis, so the trajectory after a refresh depends on
those signs. We fix them: the largest-magnitude entry of each output-side singular vector (our V, torch's
U) is positive. Runs then agree across backends.

**SVD.** `svd="full"` is the exact thin SVD in float32. `svd="randomized"` is the Halko-Martinsson-Tropp
range finder: Y = g Ω (Ω Gaussian, r + oversample columns), a few power iterations with QR in between,
then the SVD of the small Qᵀg. It is exact when rank(g) <= r + oversample and close when the spectrum
decays.

**Adam forms.** galore-torch and Fira copy the legacy transformers AdamW, whose eps sits outside the bias
correction: `sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)` (`hf_adam`). optax, torch.optim.AdamW and
FRUGAL use `m_hat / (sqrt(v_hat) + eps)` (`adam`). They differ by `eps (1 - sqrt(1 - b2^t))` in the
denominator.

**Masks.** Which leaves are projected is a bool tree (or a function of the params returning one). The
default, `kernels`, picks the leaves named `kernel` with at least two axes: in this codebase those are
exactly the linear weights, while stacked norm scales and biases (`[L, D]`) are two-axis too and must not
be projected.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from peft import path_str

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("full", "randomized")
MaskOrFn = Any  # a bool tree shaped like the params, a function params -> such a tree, or None


# ---------------------------------------------------------------------------------------------------------
# Which leaves, which side.
# ---------------------------------------------------------------------------------------------------------
def kernels(params) -> Any:
  """Default projection mask: leaves named `kernel` with >= 2 axes (every linear weight of our models)."""
  def pick(path, x):
    return getattr(x, "ndim", 0) >= 2 and path_str(path).split("/")[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(pick, params)


def resolve_mask(params, mask: MaskOrFn, who: str) -> list[bool]:
  """One bool per leaf of `params` (flatten order); a projected leaf with < 2 axes raises."""
  tree = kernels(params) if mask is None else (mask(params) if callable(mask) else mask)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    flags = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{who}: the mask must have the structure of the params: {e}") from e
  out = []
  for (path, leaf), flag in zip(with_path, flags):
    flag = bool(flag)
    if flag and jnp.ndim(leaf) < 2:
      raise ValueError(
          f"{who}: '{path_str(path)}' has shape {jnp.shape(leaf)}, but a projected leaf must be a matrix "
          "[in, out] or a stack [..., in, out]; leave it out of the mask (it then gets plain Adam).")
    out.append(flag)
  return out


def check_proj_type(proj_type: str, allowed: Sequence[str] = PROJ_TYPES) -> None:
  if proj_type not in allowed:
    raise ValueError(f"proj_type={proj_type!r}; valid: {', '.join(allowed)}")


def side_of(proj_type: str, shape: Sequence[int]) -> str:
  """'in', 'out' or 'both': which axis of our [..., in, out] leaf the projector reduces."""
  n, m = shape[-2], shape[-1]  # torch G is [m, n] = [out, in]
  torch_side = {"right": "right", "left": "left", "full": "full",
                "std": "right" if m >= n else "left",
                "reverse_std": "left" if m >= n else "right"}[proj_type]
  return {"right": "in", "left": "out", "full": "both"}[torch_side]


def effective_rank(rank: int, shape: Sequence[int]) -> int:
  return max(1, min(rank, shape[-2], shape[-1]))


def low_rank_shape(shape: Sequence[int], side: str, r: int) -> tuple[int, ...]:
  *lead, n_in, n_out = shape
  return tuple(lead) + {"in": (r, n_out), "out": (n_in, r), "both": (r, r)}[side]


def projector_zeros(shape: Sequence[int], side: str, r: int, dtype) -> Any:
  *lead, n_in, n_out = shape
  mat = lambda d: jnp.zeros((*lead, d, r), dtype)
  return {"in": lambda: mat(n_in), "out": lambda: mat(n_out), "both": lambda: (mat(n_in), mat(n_out))}[side]()


# ---------------------------------------------------------------------------------------------------------
# Projectors. All functions take [..., in, out] and broadcast over the leading axes.
# ---------------------------------------------------------------------------------------------------------
def canonical_signs(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flips singular pairs so the largest-|.| entry of each column of v ([..., out, r]) is positive."""
  idx = jnp.argmax(jnp.abs(v), axis=-2)[..., None, :]
  s = jnp.sign(jnp.take_along_axis(v, idx, axis=-2))
  s = jnp.where(s == 0, 1.0, s).astype(v.dtype)
  return u * s, v * s


def _qr(y: jax.Array) -> jax.Array:
  return jnp.linalg.qr(y, mode="reduced")[0]


def randomized_svd(g: jax.Array, rank: int, key: jax.Array, oversample: int = 8,
                   power_iters: int = 2) -> tuple[jax.Array, jax.Array]:
  """(U_r [..., in, r], V_r [..., out, r]) from a randomized range finder (G Ω -> QR, power iterations)."""
  n_in, n_out = g.shape[-2:]
  k = min(rank + oversample, n_in, n_out)
  omega = jax.random.normal(key, (*g.shape[:-2], n_out, k), g.dtype)
  gt = jnp.swapaxes(g, -1, -2)
  q = _qr(g @ omega)
  for _ in range(power_iters):  # (g gᵀ)^q sharpens the spectrum; QR keeps it well conditioned
    q = _qr(g @ _qr(gt @ q))
  ub, _, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ g, full_matrices=False)
  return (q @ ub)[..., :rank], jnp.swapaxes(vh, -1, -2)[..., :rank]


def top_singular(g: jax.Array, rank: int, method: str = "full",
                 key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Top-`rank` singular vectors (U_r [..., in, r], V_r [..., out, r]) in float32, canonical signs."""
  g32 = g.astype(jnp.float32)
  if method == "full":
    u, _, vh = jnp.linalg.svd(g32, full_matrices=False)
    u, v = u[..., :rank], jnp.swapaxes(vh, -1, -2)[..., :rank]
  elif method == "randomized":
    u, v = randomized_svd(g32, rank, key)
  else:
    raise ValueError(f"svd={method!r}; valid: {SVD_METHODS}")
  return canonical_signs(u, v)


def svd_projector(g: jax.Array, side: str, rank: int, method: str = "full",
                  key: Optional[jax.Array] = None) -> Any:
  """GaLore's projector of `g` for `side`, in g's dtype."""
  u, v = top_singular(g, rank, method, key)
  u, v = u.astype(g.dtype), v.astype(g.dtype)
  return {"in": u, "out": v, "both": (u, v)}[side]


def random_semi_orthogonal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Haar-distributed [..., d, r] matrices with orthonormal columns (QR of a Gaussian, R's signs fixed)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, tuple(shape), jnp.float32), mode="reduced")
  d = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
  return (q * jnp.where(d == 0, 1.0, d)[..., None, :]).astype(dtype)


def project(g: jax.Array, p: Any, side: str) -> jax.Array:
  if side == "in":
    return jnp.einsum("...ir,...io->...ro", p, g)
  if side == "out":
    return jnp.einsum("...io,...or->...ir", g, p)
  pl, pr = p
  return jnp.einsum("...ir,...io,...os->...rs", pl, g, pr)


def project_back(n: jax.Array, p: Any, side: str) -> jax.Array:
  if side == "in":
    return jnp.einsum("...ir,...ro->...io", p, n)
  if side == "out":
    return jnp.einsum("...ir,...or->...io", n, p)
  pl, pr = p
  return jnp.einsum("...ir,...rs,...os->...io", pl, n, pr)


def rank_axis(side: str) -> int:
  """The axis of the projected gradient R that has length r (for 'in' and 'out')."""
  return {"in": -2, "out": -1}[side]


# ---------------------------------------------------------------------------------------------------------
# Adam pieces (moments are updated in whatever space the caller chose).
# ---------------------------------------------------------------------------------------------------------
def update_moments(g, mu, nu, b1, b2):
  """Adam's moment updates, kept in the moments' dtype (a traced b1 must not promote the state)."""
  return ((b1 * mu + (1 - b1) * g).astype(mu.dtype),
          (b2 * nu + (1 - b2) * jnp.square(g)).astype(nu.dtype))


def bias_corrections(t: jax.Array, b1, b2) -> tuple[jax.Array, jax.Array]:
  """(1 - b1^t, 1 - b2^t), as -expm1(t log1p(-(1 - b))).

  `1 - 0.999**t` in float32 loses ~1e-5 relative (0.999 is not a float32); with a Python float `b`,
  `1 - b` is taken in double first and the result is accurate to float32 rounding."""
  t = jnp.asarray(t, jnp.float32)
  bc = lambda b: -jnp.expm1(t * jnp.log1p(-jnp.asarray(1 - b, jnp.float32)))
  return bc(b1), bc(b2)


def hf_adam(mu, nu, t, b1, b2, eps, raw: bool = False):
  """galore-torch / Fira (legacy transformers AdamW): sqrt(1-b2^t)/(1-b1^t) * mu / (sqrt(nu) + eps).

  With `raw=True` returns (mu / (sqrt(nu) + eps), the bias factor) separately (Fira needs both)."""
  bc1, bc2 = bias_corrections(t, b1, b2)
  n = mu / (jnp.sqrt(nu) + eps)
  factor = jnp.sqrt(bc2) / bc1
  return (n, factor) if raw else (factor * n).astype(mu.dtype)


def adam(mu, nu, t, b1, b2, eps):
  """optax / torch.optim.AdamW / FRUGAL: mu_hat / (sqrt(nu_hat) + eps)."""
  bc1, bc2 = bias_corrections(t, b1, b2)
  return ((mu / bc1) / (jnp.sqrt(nu / bc2) + eps)).astype(mu.dtype)


def is_projected(p) -> bool:
  return not isinstance(p, optax.MaskedNode)



# ---------------------------------------------------------------------------------------------------------
# Weight decay in galore-torch's order.
# ---------------------------------------------------------------------------------------------------------
class DecayUpdatedState(NamedTuple):
  count: jax.Array  # (), int32: steps done, for a learning-rate schedule


def decay_updated_weights(learning_rate: optax.ScalarOrSchedule, weight_decay,
                          mask: Optional[MaskOrFn] = None) -> optax.GradientTransformation:
  r"""Decoupled weight decay of the *updated* weight, to run after `scale_by_learning_rate`.

  galore-torch and Fira (legacy transformers AdamW) step as
  :math:`W \leftarrow (W - \eta u)(1 - \eta\lambda)`; optax's `add_decayed_weights` before the learning
  rate gives :math:`W - \eta u - \eta\lambda W`. The two differ by :math:`\eta^2 \lambda u`. Here
  `updates` arrive as :math:`-\eta u` and leave as :math:`-\eta u - \eta\lambda (W - \eta u)`.
  """
  def init_fn(params):
    del params
    return DecayUpdatedState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decay_updated_weights needs the params")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype), updates, params)
    return updates, DecayUpdatedState(count=optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def weight_decay_then_lr(learning_rate, weight_decay, weight_decay_mask, decay_updated: bool
                         ) -> list[optax.GradientTransformation]:
  """The tail of an AdamW-like chain, in optax's order or in galore-torch's (`decay_updated`)."""
  if decay_updated:
    return [optax.scale_by_learning_rate(learning_rate),
            decay_updated_weights(learning_rate, weight_decay, weight_decay_mask)]
  return [optax.add_decayed_weights(weight_decay, weight_decay_mask),
          optax.scale_by_learning_rate(learning_rate)]
