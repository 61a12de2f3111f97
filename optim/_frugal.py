r"""FRUGAL: Adam on a state-full subspace, a state-free rule on the rest of the gradient.

Zmushko, Beznosikov, Takáč, Horváth, *FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
Scalable Training*, ICML 2025 (arXiv 2411.07837). Reference code: the paper's anonymised mirror (its
`proj_optimizer_templates.py`, `galore_projector.py`, `coordinate_projector.py`, `adamw.py`).

Each projected matrix G is split by a subspace map (down, up) refreshed every `update_gap` steps
(count % gap == 0, step 0 included):

.. math::

  L = \mathrm{down}(G), \quad m, v \leftarrow \mathrm{Adam\ moments\ of\ } L, \quad
  u = \mathrm{up}\Big(\frac{\hat m}{\sqrt{\hat v} + \epsilon}\Big)
      + \kappa\, \rho\big(G - \mathrm{up}(L)\big)

with :math:`\rho \in \{\mathrm{sign}, \mathrm{id}, 0\}` (`inactive_update_rule` sign_sgd | sgd | no) and
:math:`\kappa` = `inactive_lr_scale` (1.0 for pre-training, 0.1 for fine-tuning in the paper). The update
is full-rank while the state is the subspace's. With `reset_statistics` (default) the moments are zeroed
and the bias correction restarts at every refresh. Adam uses optax's eps placement (the reference's
`AdamW`), weight decay is optax's order (the reference multiplies W by 1 - lr wd before the step).

Subspaces (`subspace=`), with density ρ:

* `svd`: GaLore's projector on the side given by `proj_type` (std | reverse_std | left | right, named on
  the torch [out, in] matrix, see `peft._projector`), rank `round(ρ · reduced dim)`;
* `random`: a Haar random semi-orthogonal projector, same sides and rank;
* `columns` / `rows`: `int(ρ · n)` random columns (input features) / rows (output features) of the torch
  matrix, i.e. rows / columns of our [in, out] kernel;
* `randk`: `int(ρ · in · out)` random entries;
* `block`: whole matrices (BAdam style, the reference's `--optimizer frugal` default): every slice of every
  projected leaf is a block; `round(ρ · #blocks)` are active, in `block_order` random | ascending |
  descending | mirror over the blocks listed leaf by leaf in tree order, then by slice. Active blocks get
  Adam with fresh moments, inactive ones the state-free rule. Shapes are static under jit, so block mode
  keeps moments for every block (zero while inactive): its memory saving needs the slot design of the
  layer samplers, not this transform.

Random choices come from `jax.random.key(seed)` folded with the step and the leaf index, so a resumed run
draws the same subspaces. `density` and `update_gap` set shapes: pass them as `static_args` to
`optax.inject_hyperparams`. Leaves outside the mask get plain Adam. The reference's `proj_params_lr_scale`
(a learning-rate factor on the split leaves) is an `optax.partition` with its own schedule here.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim import _projector as pj
from optim._registry import PROJECTED, path_mask, register_optimizer

SUBSPACES = ("svd", "random", "columns", "rows", "randk", "block")
INACTIVE_RULES = ("sign_sgd", "sgd", "no")
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
FRUGAL_PROJ_TYPES = ("std", "reverse_std", "left", "right")


class ScaleByFrugalState(NamedTuple):
  count: jax.Array         # (), int32: updates done so far
  projector: optax.Params  # per leaf: [..., d, r] (svd, random), int32 [..., k] (columns, rows, randk),
                           # bool [...] active (block); MaskedNode where not projected
  mu: optax.Updates        # per leaf: the subspace's shape where projected, the leaf's shape elsewhere
  nu: optax.Updates


def _batched(fn, n_lead: int):
  for _ in range(n_lead):
    fn = jax.vmap(fn)
  return fn


def _n_coords(subspace: str, shape, density: float) -> int:
  n = {"columns": shape[-2], "rows": shape[-1], "randk": shape[-2] * shape[-1]}[subspace]
  return max(1, int(n * density))


def _down(g, idx, subspace):
  """One matrix [in, out] -> the chosen coordinates."""
  if subspace == "columns":
    return g[idx, :]
  if subspace == "rows":
    return g[:, idx]
  return g.reshape(-1)[idx]


def _up(low, idx, subspace, shape):
  z = jnp.zeros(shape, low.dtype)
  if subspace == "columns":
    return z.at[idx, :].set(low)
  if subspace == "rows":
    return z.at[:, idx].set(low)
  return z.reshape(-1).at[idx].set(low).reshape(shape)


def _inactive(res, rule: str):
  return {"sign_sgd": jnp.sign, "sgd": lambda x: x, "no": jnp.zeros_like}[rule](res)


def _block_indices(k, n: int, n_active: int, order: str, key):
  """The active block ids of the k-th period (the reference's `next_block_start` walk, in closed form)."""
  j = jnp.arange(n_active)
  if order == "random":
    return jax.random.permutation(key, n)[:n_active]
  if order == "ascending":
    return (k * n_active + j) % n
  if order == "descending":
    return (n - 1 - k * n_active - j) % n
  half, j = n // 2, jnp.arange(n_active // 2)
  i = (k * (n_active // 2) + j) % half
  return jnp.concatenate([i, n - 1 - i])


def scale_by_frugal(density: float = 0.25, update_gap: int = 200, subspace: str = "block",
                    proj_type: str = "std", inactive_update_rule: str = "sign_sgd",
                    inactive_lr_scale: float = 1.0, reset_statistics: bool = True,
                    block_order: str = "random",
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, svd: str = "full", seed: int = 0,
                    mask: Optional[pj.MaskOrFn] = None) -> optax.GradientTransformation:
  """FRUGAL's direction (see the module docstring); multiply by -lr outside.

  Args:
    density: ρ, the state-full fraction (of the reduced dimension, of the coordinates or of the blocks).
    update_gap: steps between subspace refreshes.
    subspace: svd | random | columns | rows | randk | block.
    proj_type: side of the svd / random projector (torch naming).
    inactive_update_rule: sign_sgd | sgd | no, for the state-free part.
    inactive_lr_scale: κ, its learning-rate multiplier.
    reset_statistics: zero the moments and restart the bias correction at each refresh (block mode always
      does, as the reference).
    block_order: random | ascending | descending | mirror (block mode).
    b1, b2, eps: Adam's (optax placement).
    svd: "full" or "randomized" (svd subspace).
    seed: seed of the random subspaces.
    mask: which leaves are split (bool tree or params -> bool tree); default `peft._projector.kernels`.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density}")
  if not isinstance(update_gap, int) or update_gap <= 0:
    raise ValueError(f"update_gap must be a positive int, got {update_gap!r}")
  for name, value, valid in (("subspace", subspace, SUBSPACES),
                             ("inactive_update_rule", inactive_update_rule, INACTIVE_RULES),
                             ("block_order", block_order, BLOCK_ORDERS), ("svd", svd, pj.SVD_METHODS)):
    if value not in valid:
      raise ValueError(f"{name}={value!r}; valid: {', '.join(valid)}")
  pj.check_proj_type(proj_type, FRUGAL_PROJ_TYPES)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    flags = pj.resolve_mask(params, mask, "scale_by_frugal")
    projs, mus = [], []
    for x, on in zip(leaves, flags):
      lead = x.shape[:-2]
      if not on:
        projs.append(optax.MaskedNode())
        mus.append(jnp.zeros_like(x))
      elif subspace in ("svd", "random"):
        side = pj.side_of(proj_type, x.shape)
        r = max(1, round(x.shape[-2 if side == "in" else -1] * density))
        projs.append(pj.projector_zeros(x.shape, side, r, x.dtype))
        mus.append(jnp.zeros(pj.low_rank_shape(x.shape, side, r), x.dtype))
      elif subspace == "block":
        projs.append(jnp.zeros(lead, bool))
        mus.append(jnp.zeros_like(x))
      else:
        k = _n_coords(subspace, x.shape, density)
        projs.append(jnp.zeros((*lead, k), jnp.int32))
        low = jax.eval_shape(_batched(lambda g, i: _down(g, i, subspace), len(lead)), x, projs[-1])
        mus.append(jnp.zeros(low.shape, x.dtype))
    if subspace == "block" and block_order == "mirror":
      n = sum(math.prod(x.shape[:-2]) for x, on in zip(leaves, flags) if on)
      if round(n * density) % 2:
        raise ValueError(f"block_order='mirror' needs an even number of active blocks; "
                         f"{n} blocks at density {density} give {round(n * density)}")
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    return ScaleByFrugalState(jnp.zeros([], jnp.int32), unflat(projs), unflat(mus),
                              unflat([jnp.zeros_like(m) for m in mus]))

  def new_subspace(g, p, key):
    """A fresh projector / index set for one leaf (the block case is global, see `new_blocks`)."""
    lead = g.shape[:-2]
    if subspace in ("svd", "random"):
      side = pj.side_of(proj_type, g.shape)
      if subspace == "svd":
        return pj.svd_projector(g, side, p.shape[-1], svd, key).astype(p.dtype)
      return pj.random_semi_orthogonal(key, p.shape, p.dtype)
    n = {"columns": g.shape[-2], "rows": g.shape[-1], "randk": g.shape[-2] * g.shape[-1]}[subspace]
    keys = jax.random.split(key, math.prod(lead)).reshape(lead) if lead else key
    draw = lambda kk: jax.random.permutation(kk, n)[:p.shape[-1]].astype(jnp.int32)
    return _batched(draw, len(lead))(keys)

  def new_blocks(count, actives, key):
    sizes = [a.size for a in actives]
    n = sum(sizes)
    n_active = round(n * density)
    idx = _block_indices(count // update_gap, n, n_active, block_order, key)
    flat = jnp.zeros(n, bool).at[idx].set(True)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [flat[o:o + s].reshape(a.shape) for o, s, a in zip(offsets, sizes, actives)]

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    projs, mus, nus = (treedef.flatten_up_to(s) for s in (state.projector, state.mu, state.nu))
    count = state.count
    refresh = count % update_gap == 0
    base_key = jax.random.fold_in(jax.random.key(seed), count)
    reset = reset_statistics or subspace == "block"
    t_full = count + 1
    t_proj = count % update_gap + 1 if reset else t_full

    if subspace == "block":
      on = [i for i, p in enumerate(projs) if pj.is_projected(p)]
      if on:
        old = [projs[i] for i in on]
        new = jax.lax.cond(refresh, lambda: new_blocks(count, old, base_key), lambda: old)
        for i, a in zip(on, new):
          projs[i] = a

    out, new_mu, new_nu = [], [], []
    for i, (g, p, mu, nu) in enumerate(zip(leaves, projs, mus, nus)):
      if not pj.is_projected(p):
        mu, nu = pj.update_moments(g, mu, nu, b1, b2)
        u = pj.adam(mu, nu, t_full, b1, b2, eps)
      else:
        if reset:
          mu, nu = (jnp.where(refresh, jnp.zeros_like(x), x) for x in (mu, nu))
        if subspace == "block":
          a = p[..., None, None]
          mu, nu = (jnp.where(a, x, jnp.zeros_like(x)) for x in pj.update_moments(g, mu, nu, b1, b2))
          rest = inactive_lr_scale * _inactive(g, inactive_update_rule)
          u = jnp.where(a, pj.adam(mu, nu, t_proj, b1, b2, eps), rest)
        else:
          p = jax.lax.cond(refresh, lambda: new_subspace(g, p, jax.random.fold_in(base_key, i)), lambda: p)
          if subspace in ("svd", "random"):
            side = pj.side_of(proj_type, g.shape)
            down = lambda x: pj.project(x, p, side)
            up = lambda x: pj.project_back(x, p, side)
          else:
            n_lead = g.ndim - 2
            down = lambda x: _batched(lambda gg, ii: _down(gg, ii, subspace), n_lead)(x, p)
            up = lambda x: _batched(lambda ll, ii: _up(ll, ii, subspace, g.shape[-2:]), n_lead)(x, p)
          low = down(g)
          mu, nu = pj.update_moments(low, mu, nu, b1, b2)
          res = g - up(low)
          rest = inactive_lr_scale * _inactive(res, inactive_update_rule)
          u = up(pj.adam(mu, nu, t_proj, b1, b2, eps)) + rest
        projs[i] = p
      out.append(u.astype(g.dtype))
      new_mu.append(mu)
      new_nu.append(nu)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    state = ScaleByFrugalState(optax.safe_increment(count), unflat(projs), unflat(new_mu), unflat(new_nu))
    return unflat(out), state

  return optax.GradientTransformation(init_fn, update_fn)


def frugal(learning_rate: optax.ScalarOrSchedule, density: float = 0.25, update_gap: int = 200,
           subspace: str = "block", proj_type: str = "std", inactive_update_rule: str = "sign_sgd",
           inactive_lr_scale: float = 1.0, reset_statistics: bool = True, block_order: str = "random",
           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, svd: str = "full", seed: int = 0,
           weight_decay: float = 0.0, mask: Optional[pj.MaskOrFn] = None,
           weight_decay_mask: Optional[pj.MaskOrFn] = None) -> optax.GradientTransformation:
  r"""FRUGAL-AdamW: :math:`W \leftarrow W - \eta\,(u_t + \lambda W)` with :math:`u_t` from `scale_by_frugal`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = frugal(1e-3, density=0.25, subspace="columns", update_gap=50)
    >>> tx.init({"kernel": jnp.ones((16, 8))})[0].mu["kernel"].shape   # 4 of 16 input features
    (4, 8)
  """
  return optax.chain(
      scale_by_frugal(density, update_gap, subspace, proj_type, inactive_update_rule, inactive_lr_scale,
                      reset_statistics, block_order, b1, b2, eps, svd, seed, mask),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))


@register_optimizer("frugal", options_from=frugal)
def _frugal_from_config(learning_rate, *, projected: str = PROJECTED, **options):
  """`config.optim.frugal`: `projected` is the regex of the split leaves (the rest get plain Adam)."""
  return frugal(learning_rate, mask=path_mask(projected), **options)
