r"""Fira: GaLore's low-rank Adam plus a norm-scaled full-rank residual.

Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?*
(arXiv 2410.01623); reference code `xichen-fy/Fira: optimizer_torch/fira_adamw.py` (PyPI `fira`).

Per projected matrix, with GaLore's projector P (refreshed by SVD every T steps, see `peft._galore`),
:math:`R = \mathrm{proj}_P(G)`, Adam moments m, v of R and :math:`N = m / (\sqrt{v} + \epsilon)`:

.. math::

  \phi_j = \frac{\lVert N_{:,j} \rVert}{\lVert R_{:,j} \rVert + 10^{-8}}, \qquad
  S = \big(G - \alpha\,\mathrm{back}_P(R)\big) \odot \phi,

  S \leftarrow S / \ell, \quad \ell = \max\Big(\frac{\lVert S \rVert}{s_{t-1} + 10^{-8}}, \gamma\Big)/\gamma,
  \quad s_t = \lVert S \rVert \;(\text{after limiting}),

  u = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\big(\alpha\,\mathrm{back}_P(N) + S\big).

:math:`\phi` has one entry per index of the dimension that is *not* reduced (column norms over the r
axis of R); the norm-growth limiter (:math:`\gamma = 1.01`) keeps :math:`\lVert S_t\rVert \le
\gamma \lVert S_{t-1}\rVert`, with one previous norm per matrix (per layer of a stack); at the first step
it only records the norm. As in the reference code:

* the residual subtracts :math:`\alpha\,\mathrm{back}_P(R)` (galore-torch's `project_back` includes the
  scale), so with :math:`\alpha \neq 1` it keeps :math:`(1-\alpha)` of the projected part (METHODS.md
  writes `G - P R`; the two agree at :math:`\alpha = 1`);
* the Adam bias factor multiplies the residual too, while :math:`\phi` and the limiter see the
  uncorrected N (galore-torch's eps placement, `peft._projector.hf_adam`);
* `proj_type="full"` is not supported (R is r x r: no column norms to match G's).

`fira` adds decoupled weight decay (`decay_updated_weights=True` for the reference's order) and the
learning rate. Leaves outside the mask get plain Adam.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim import _galore
from optim import _projector as pj
from optim._registry import PROJECTED, path_mask, register_optimizer

FIRA_PROJ_TYPES = ("std", "reverse_std", "left", "right")


class ScaleByFiraState(NamedTuple):
  count: jax.Array         # (), int32: updates done so far
  projector: optax.Params  # per leaf [..., in|out, r]; MaskedNode where not projected
  mu: optax.Updates        # per leaf: [..., low-rank shape] where projected, the leaf's shape elsewhere
  nu: optax.Updates
  residual_norm: optax.Params  # per leaf [...] (one per matrix): last ||S||, the limiter's memory


def scale_by_fira(rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                  gamma: float = 1.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  svd: str = "full", reset_on_refresh: bool = False, mask: Optional[pj.MaskOrFn] = None
                  ) -> optax.GradientTransformation:
  """Fira's direction (see the module docstring); multiply by -lr outside.

  Args: as `scale_by_galore` (`scale` is Fira's alpha), plus
    gamma: the norm-growth limit of the residual (Fira's 1.01).
  """
  _galore._check_common(rank, update_proj_gap, svd)
  pj.check_proj_type(proj_type, FIRA_PROJ_TYPES)

  def init_fn(params):
    projector, mu, nu = _galore.init_projected(params, mask, proj_type, rank, "scale_by_fira")
    leaves, treedef = jax.tree.flatten(params)
    norms = jax.tree.unflatten(treedef, [
        jnp.zeros(x.shape[:-2], jnp.float32) if pj.is_projected(p) else optax.MaskedNode()
        for x, p in zip(leaves, treedef.flatten_up_to(projector))])
    return ScaleByFiraState(jnp.zeros([], jnp.int32), projector, mu, nu, norms)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    projs, mus, nus, norms = (treedef.flatten_up_to(s) for s in
                              (state.projector, state.mu, state.nu, state.residual_norm))
    count = state.count
    refresh = count % update_proj_gap == 0
    t_full = count + 1
    t_proj = count % update_proj_gap + 1 if reset_on_refresh else t_full
    out, new_p, new_mu, new_nu, new_norm = [], [], [], [], []
    for i, (g, p, mu, nu, prev) in enumerate(zip(leaves, projs, mus, nus, norms)):
      if not pj.is_projected(p):
        mu, nu = pj.update_moments(g, mu, nu, b1, b2)
        u = pj.hf_adam(mu, nu, t_full, b1, b2, eps)
      else:
        side = pj.side_of(proj_type, g.shape)
        p = _galore.refreshed(g, p, refresh, side, svd, count, i)
        if reset_on_refresh:
          mu, nu = (jnp.where(refresh, jnp.zeros_like(x), x) for x in (mu, nu))
        r = pj.project(g, p, side)
        mu, nu = pj.update_moments(r, mu, nu, b1, b2)
        n, factor = pj.hf_adam(mu, nu, t_proj, b1, b2, eps, raw=True)
        u, prev = _fira_direction(g, r, n, p, side, prev, count == 0, scale, gamma)
        u = factor * u
      out.append(u.astype(g.dtype))
      new_p.append(p)
      new_mu.append(mu)
      new_nu.append(nu)
      new_norm.append(prev)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    state = ScaleByFiraState(optax.safe_increment(count), unflat(new_p), unflat(new_mu), unflat(new_nu),
                             unflat(new_norm))
    return unflat(out), state

  return optax.GradientTransformation(init_fn, update_fn)


def _fira_direction(g, r, n, p, side, prev_norm, first, scale, gamma):
  """(alpha back(N) + limited S, new ||S||) for one leaf; everything per matrix over the leading axes."""
  k = pj.rank_axis(side)
  phi = jnp.linalg.norm(n, axis=k, keepdims=True) / (jnp.linalg.norm(r, axis=k, keepdims=True) + 1e-8)
  # phi is indexed by the unreduced dimension: [..., 1, out] for side "in", [..., in, 1] for side "out".
  s = (g - scale * pj.project_back(r, p, side)) * phi
  s_norm = jnp.linalg.norm(s.astype(jnp.float32), axis=(-2, -1))
  limiter = jnp.where(first, 1.0, jnp.maximum(s_norm / (prev_norm + 1e-8), gamma) / gamma)
  s = s / limiter[..., None, None].astype(s.dtype)
  return scale * pj.project_back(n, p, side) + s, s_norm / limiter


def fira(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
         scale: float = 1.0, proj_type: str = "std", gamma: float = 1.01, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, svd: str = "full", reset_on_refresh: bool = False, weight_decay: float = 0.0,
         mask: Optional[pj.MaskOrFn] = None, weight_decay_mask: Optional[pj.MaskOrFn] = None,
         decay_updated_weights: bool = False) -> optax.GradientTransformation:
  r"""Fira-AdamW: :math:`W \leftarrow W - \eta\,(u_t + \lambda W)` with :math:`u_t` from `scale_by_fira`.

  README recipe (pre-training): lr 0.01, scale (alpha) 0.25, rank 128, update_proj_gap 200.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = fira(1e-2, rank=2, update_proj_gap=10, scale=0.25)
    >>> state = tx.init({"kernel": jnp.ones((2, 8, 16))})   # two stacked layers
    >>> state[0].residual_norm["kernel"].shape
    (2,)
  """
  return optax.chain(
      scale_by_fira(rank, update_proj_gap, scale, proj_type, gamma, b1, b2, eps, svd, reset_on_refresh, mask),
      *pj.weight_decay_then_lr(learning_rate, weight_decay, weight_decay_mask, decay_updated_weights))


@register_optimizer("fira", options_from=fira)
def _fira_from_config(learning_rate, *, projected: str = PROJECTED, **options):
  """`config.optim.fira`: `projected` is the regex of the projected leaves (the rest get plain Adam)."""
  return fira(learning_rate, mask=path_mask(projected), **options)
