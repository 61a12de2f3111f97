r"""GaLore: Adam moments in a low-rank projection of each gradient matrix.

Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection*, ICML 2024
(arXiv 2403.03507); reference code `jiaweizzhao/GaLore: galore_torch/{adamw,galore_projector}.py`.

For a projected leaf with gradient :math:`G_t` and a projector :math:`P` refreshed from the SVD of the
current gradient whenever :math:`t \bmod T = 0` (step 0 included):

.. math::

  R_t = \mathrm{proj}_P(G_t), \quad m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t, \quad
  v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2,

  u_t = \alpha \, \mathrm{back}_P\Big(\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{v_t} + \epsilon}\Big)

with the projection types of `peft._projector` (named on the torch [out, in] matrix, so `std` on our
[in, out] kernel reproduces galore-torch `std` on the same weight). The moments are *not* reset at a
refresh (they then mix two bases, as in galore-torch); `reset_on_refresh=True` zeroes them and restarts the
bias correction (the "momentum reset" of METHODS C6). Leaves outside the mask get the same
Adam on the full gradient without `scale`. `galore` adds decoupled weight decay and the learning rate.

Memory: for a [in, out] kernel the moments are 2·r·max(in, out) (`std`) or 2·r·min(in, out)
(`reverse_std`), plus the projector (in or out)·r.

**Relation to `optax.contrib.galore`.** optax projects the left side of our [in, out] gradient when
in >= out, i.e. always the larger dimension: that is galore-torch `reverse_std` (here
`proj_type="reverse_std"`), with moments r·min(in, out). Its `base_optimizer` must be scale-only
(`scale_by_adam`; `adamw` would decay the low-rank proxies), it keeps the optax eps placement
(`m_hat / (sqrt(v_hat) + eps)`) and does not fix singular-vector signs. With `eps=0`, a non-square kernel
and no refresh after step 0 the two coincide (a test checks it). We keep our own transform (optax's
helpers are private and tied to its one side choice) for the galore-torch eps placement, the five
projection types, stacked kernels, the randomized SVD, the momentum reset and canonical signs; the optax
test serves as an in-JAX cross-check.

**Pitfalls.** Run the SVD on the gathered gradient under FSDP (XLA inserts the gather; a per-shard SVD
would be a different method). The refresh is a `lax.cond` on `count`, so the jitted step never recompiles;
on TPU a 4096 x 11008 SVD is slow, hence `svd="randomized"`.

Usage (`inject_hyperparams` needs the ints and the mask function static)::

  tx = galore(1e-3, rank=128, update_proj_gap=200, scale=0.25)
  tx = optax.inject_hyperparams(galore, static_args=("rank", "update_proj_gap"))(
      learning_rate=optax.cosine_decay_schedule(1e-3, 1000), rank=128)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim import _projector as pj
from optim._registry import PROJECTED, path_mask, register_optimizer


class ScaleByGaLoreState(NamedTuple):
  count: jax.Array         # (), int32: updates done so far
  projector: optax.Params  # per leaf [..., in|out, r] (a pair for "full"); MaskedNode where not projected
  mu: optax.Updates        # per leaf: [..., low-rank shape] where projected, the leaf's shape elsewhere
  nu: optax.Updates


def _check_common(rank: int, update_proj_gap: int, svd: str) -> None:
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
    raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
  if svd not in pj.SVD_METHODS:
    raise ValueError(f"svd={svd!r}; valid: {', '.join(pj.SVD_METHODS)}")


def init_projected(params, mask, proj_type: str, rank: int, who: str):
  """(projector, mu, nu): zero projectors and low-rank moments where masked in, full moments elsewhere."""
  leaves, treedef = jax.tree.flatten(params)
  flags = pj.resolve_mask(params, mask, who)
  projs, mus = [], []
  for x, on in zip(leaves, flags):
    if on:
      side = pj.side_of(proj_type, x.shape)
      r = pj.effective_rank(rank, x.shape)
      projs.append(pj.projector_zeros(x.shape, side, r, x.dtype))
      mus.append(jnp.zeros(pj.low_rank_shape(x.shape, side, r), x.dtype))
    else:
      projs.append(optax.MaskedNode())
      mus.append(jnp.zeros_like(x))
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)
  return unflat(projs), unflat(mus), unflat([jnp.zeros_like(m) for m in mus])


def refreshed(g, p, refresh, side: str, svd: str, count, leaf_index: int):
  """The projector after this step: the SVD of g when `refresh`, else p (lax.cond: no recompilation)."""
  def new():
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), count), leaf_index)
    r = (p[0] if side == "both" else p).shape[-1]
    return jax.tree.map(lambda a, b: a.astype(b.dtype), pj.svd_projector(g, side, r, svd, key), p)
  return jax.lax.cond(refresh, new, lambda: p)


def scale_by_galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, svd: str = "full",
                    reset_on_refresh: bool = False, mask: Optional[pj.MaskOrFn] = None
                    ) -> optax.GradientTransformation:
  """GaLore's direction (see the module docstring); multiply by -lr outside.

  Args:
    rank: projection rank r (clipped per leaf to min(in, out)).
    update_proj_gap: T, steps between projector refreshes (refresh when count % T == 0).
    scale: alpha, multiplies the projected-back update (galore-torch `scale`).
    proj_type: std | reverse_std | left | right | full, named on the torch [out, in] matrix.
    b1, b2, eps: Adam's, eps placed as in galore-torch (outside the bias correction).
    svd: "full" (exact, float32) or "randomized" (range finder, for large kernels).
    reset_on_refresh: zero the moments and restart the bias correction at each refresh.
    mask: which leaves to project (bool tree or params -> bool tree); default `peft._projector.kernels`.
      Unlike `optax.contrib.galore`'s `mask`, this is not the weight-decay mask.
  """
  _check_common(rank, update_proj_gap, svd)
  pj.check_proj_type(proj_type)

  def init_fn(params):
    projector, mu, nu = init_projected(params, mask, proj_type, rank, "scale_by_galore")
    return ScaleByGaLoreState(jnp.zeros([], jnp.int32), projector, mu, nu)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    projs, mus, nus = (treedef.flatten_up_to(s) for s in (state.projector, state.mu, state.nu))
    count = state.count
    refresh = count % update_proj_gap == 0
    t_full = count + 1
    t_proj = count % update_proj_gap + 1 if reset_on_refresh else t_full
    out, new_p, new_mu, new_nu = [], [], [], []
    for i, (g, p, mu, nu) in enumerate(zip(leaves, projs, mus, nus)):
      if not pj.is_projected(p):
        mu, nu = pj.update_moments(g, mu, nu, b1, b2)
        u = pj.hf_adam(mu, nu, t_full, b1, b2, eps)
      else:
        side = pj.side_of(proj_type, g.shape)
        p = refreshed(g, p, refresh, side, svd, count, i)
        if reset_on_refresh:
          mu, nu = (jnp.where(refresh, jnp.zeros_like(x), x) for x in (mu, nu))
        mu, nu = pj.update_moments(pj.project(g, p, side), mu, nu, b1, b2)
        u = scale * pj.project_back(pj.hf_adam(mu, nu, t_proj, b1, b2, eps), p, side)
      out.append(u.astype(g.dtype))
      new_p.append(p)
      new_mu.append(mu)
      new_nu.append(nu)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    state = ScaleByGaLoreState(optax.safe_increment(count), unflat(new_p), unflat(new_mu), unflat(new_nu))
    return unflat(out), state

  return optax.GradientTransformation(init_fn, update_fn)


def galore(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
           scale: float = 1.0, proj_type: str = "std", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           svd: str = "full", reset_on_refresh: bool = False, weight_decay: float = 0.0,
           mask: Optional[pj.MaskOrFn] = None, weight_decay_mask: Optional[pj.MaskOrFn] = None,
           decay_updated_weights: bool = False) -> optax.GradientTransformation:
  r"""GaLore-AdamW: :math:`W \leftarrow W - \eta\,(u_t + \lambda W)` with :math:`u_t` from `scale_by_galore`.

  `mask` picks the projected leaves (the others get plain Adam); `weight_decay_mask` the decayed ones.
  `decay_updated_weights=True` decays the already-updated weight, :math:`(W - \eta u)(1 - \eta\lambda)`, as
  galore-torch's AdamW does (it differs from optax's order by :math:`\eta^2\lambda u`).

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection, 2024.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}
    >>> tx = galore(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> state[0].mu["kernel"].shape   # std: torch G is [16, 8], m >= n, the 8 inputs are reduced
    (2, 16)
  """
  return optax.chain(
      scale_by_galore(rank, update_proj_gap, scale, proj_type, b1, b2, eps, svd, reset_on_refresh, mask),
      *pj.weight_decay_then_lr(learning_rate, weight_decay, weight_decay_mask, decay_updated_weights))


@register_optimizer("galore", options_from=galore)
def _galore_from_config(learning_rate, *, projected: str = PROJECTED, **options):
  """`config.optim.galore`: `projected` is the regex of the projected leaves (the rest get plain Adam)."""
  return galore(learning_rate, mask=path_mask(projected), **options)
