r"""LIFT: sparse fine-tuning of the principal weights, with optimizer state for them only.

Liu et al., *LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for
Reasoning-Focused Supervised Fine-Tuning*, ICML 2025; reference code `zihanghliu/LIFT: src/sparseAdam.py`
(`SparseAdamW`, `mask_type='lift_sparse'`).

For each selected weight matrix W (m x n), with :math:`W_r` its best rank-r approximation (truncated SVD,
`filter_rank` r), the principal weights are the k entries of largest :math:`|W_r|`, with LoRA's parameter
count :math:`k = \min((m + n)\,\rho, mn)` for a "LoRA rank" :math:`\rho` (`rank`). Only those entries update,
by Adam on the gathered gradient :math:`g_S`:

.. math::

  m \leftarrow \beta_1 m + (1-\beta_1) g_S, \quad v \leftarrow \beta_2 v + (1-\beta_2) g_S^2, \quad
  W_S \leftarrow W_S - \eta\Big(\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\frac{m}{\sqrt v + \epsilon}
  + \lambda W_S\Big)

(the legacy transformers AdamW form the reference uses, eps outside the bias correction). The state per
matrix is the index set [k] int32 (flat indices into m*n, ascending) and m, v [k]: static shapes, 3k numbers
instead of Adam's 2mn. Stacked decoder kernels `[L, in, out]` get one index set per layer.

**Mask refresh.** The index set is computed from the initial weights at `init` and recomputed from the
current weights before the step whenever :math:`(t + 1) \bmod T = 0` with t the steps done
(`update_interval` T), which is when the reference's `step` calls `update_masks()` (after its step number
t with :math:`(t+1) \bmod T = 0`). Entries in both the old and the new set keep their moments; entries that
enter start from zero moments; entries that leave drop theirs (their weights keep the value they reached).
The step count t is per transform and keeps running (as the reference's per-parameter `step`), so an entering
entry's first update uses the current bias correction. The refresh is a `lax.cond` on the count: the jitted
step never recompiles.

**Reference defaults** (`bash_scripts/slurm_config_lift_math.txt`, `finetune_sft.py`): rank 128,
filter_rank 32-128 (64 for Llama-2-7B), update_interval 400 (10 for Llama-3.2-3B), betas (0.9, 0.95),
eps 1e-6, no weight decay, lr 1e-4..2e-4; only the attention/MLP projections train (biases, norms,
embeddings and `lm_head` are frozen: `--no_grad head`). Weight decay (off there) is applied to the selected
entries before the step, in optax's order, where the reference decays the updated value.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim import _projector as pj
from optim._registry import path_mask, register_optimizer


class ScaleByLiftState(NamedTuple):
  count: jax.Array        # (), int32: steps done
  idx: optax.Params       # per selected leaf [..., k] int32 flat indices (ascending); MaskedNode elsewhere
  mu: optax.Updates       # per selected leaf [..., k]; the leaf's shape elsewhere (plain Adam)
  nu: optax.Updates


def num_principal(shape, rank: int) -> int:
  """k = min((in + out) * rank, in * out) for a kernel [..., in, out]."""
  m, n = shape[-2], shape[-1]
  return int(min((m + n) * rank, m * n))


def low_rank_approximation(w: jax.Array, filter_rank: int) -> jax.Array:
  """W_r [..., in, out]: the truncated SVD of w (float32), r clipped to min(in, out)."""
  w = w.astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  r = min(filter_rank, min(w.shape[-2:]))
  return jnp.einsum("...ir,...r,...ro->...io", u[..., :r], s[..., :r], vt[..., :r, :])


def principal_indices(w: jax.Array, filter_rank: int, k: int) -> jax.Array:
  """[..., k] int32 ascending flat indices of the k entries of largest |W_r|."""
  scores = jnp.abs(low_rank_approximation(w, filter_rank)).reshape(w.shape[:-2] + (-1,))
  _, top = jax.lax.top_k(scores, k)
  return jnp.sort(top, axis=-1).astype(jnp.int32)


def carry_moments(old_idx, new_idx, mu, nu):
  """Moments on the new index set: kept for entries in both sets, zero for entries that enter."""
  def one(old, new, m, v):
    pos = jnp.clip(jnp.searchsorted(old, new), 0, old.shape[0] - 1)
    kept = old[pos] == new
    return jnp.where(kept, m[pos], 0).astype(m.dtype), jnp.where(kept, v[pos], 0).astype(v.dtype)
  for _ in range(old_idx.ndim - 1):
    one = jax.vmap(one)
  return one(old_idx, new_idx, mu, nu)


def _gather(x, idx):
  return jnp.take_along_axis(x.reshape(idx.shape[:-1] + (-1,)), idx, axis=-1)


def _scatter(values, idx, shape, dtype):
  flat = jnp.zeros(idx.shape[:-1] + (shape[-2] * shape[-1],), dtype)
  lead = jnp.indices(idx.shape)[:-1]
  return flat.at[(*lead, idx)].set(values.astype(dtype)).reshape(shape)


def scale_by_lift(rank: int = 128, filter_rank: int = 64, update_interval: int = 400, b1: float = 0.9,
                  b2: float = 0.95, eps: float = 1e-6, weight_decay: float = 0.0,
                  mask: Optional[pj.MaskOrFn] = None) -> optax.GradientTransformation:
  """LIFT's sparse Adam direction (see the module docstring); multiply by -lr outside.

  Args:
    rank: rho; each selected matrix trains k = min((in + out) * rho, in * out) entries.
    filter_rank: r of the low-rank approximation whose magnitudes pick the entries.
    update_interval: T; the entries are re-picked before the step when (steps done + 1) % T == 0.
    b1, b2, eps: Adam's, eps outside the bias correction (legacy transformers AdamW).
    weight_decay: decoupled decay of the selected entries.
    mask: which leaves are sparse (bool tree or params -> bool tree); default every kernel. The other leaves
      get the same Adam densely.
  """
  for name, v in (("rank", rank), ("filter_rank", filter_rank), ("update_interval", update_interval)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"lift: {name} must be a positive int, got {v!r}")

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    flags = pj.resolve_mask(params, mask, "scale_by_lift")
    idx, mus = [], []
    for x, on in zip(leaves, flags):
      if on:
        i = principal_indices(x, filter_rank, num_principal(x.shape, rank))
        idx.append(i)
        mus.append(jnp.zeros(i.shape, x.dtype))
      else:
        idx.append(optax.MaskedNode())
        mus.append(jnp.zeros_like(x))
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    return ScaleByLiftState(jnp.zeros([], jnp.int32), unflat(idx), unflat(mus),
                            unflat([jnp.zeros_like(m) for m in mus]))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lift needs params (the mask refresh reads the weights)")
    leaves, treedef = jax.tree.flatten(updates)
    ws, idxs, mus, nus = (treedef.flatten_up_to(t) for t in (params, state.idx, state.mu, state.nu))
    count = state.count
    t = count + 1
    refresh = (count + 1) % update_interval == 0
    out, new_idx, new_mu, new_nu = [], [], [], []
    for g, w, idx, mu, nu in zip(leaves, ws, idxs, mus, nus):
      if isinstance(idx, optax.MaskedNode):
        mu, nu = pj.update_moments(g, mu, nu, b1, b2)
        u = pj.hf_adam(mu, nu, t, b1, b2, eps)
        if weight_decay:
          u = u + weight_decay * w
      else:
        def repick(w=w, idx=idx, mu=mu, nu=nu):
          i = principal_indices(w, filter_rank, idx.shape[-1])
          return (i, *carry_moments(idx, i, mu, nu))
        idx, mu, nu = jax.lax.cond(refresh, repick, lambda idx=idx, mu=mu, nu=nu: (idx, mu, nu))
        mu, nu = pj.update_moments(_gather(g, idx), mu, nu, b1, b2)
        u_sel = pj.hf_adam(mu, nu, t, b1, b2, eps)
        if weight_decay:
          u_sel = u_sel + weight_decay * _gather(w, idx).astype(u_sel.dtype)
        u = _scatter(u_sel, idx, g.shape, g.dtype)
      out.append(u.astype(g.dtype))
      new_idx.append(idx)
      new_mu.append(mu)
      new_nu.append(nu)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    return unflat(out), ScaleByLiftState(optax.safe_increment(count), unflat(new_idx), unflat(new_mu),
                                         unflat(new_nu))

  return optax.GradientTransformation(init_fn, update_fn)


def lift(learning_rate: optax.ScalarOrSchedule, rank: int = 128, filter_rank: int = 64,
         update_interval: int = 400, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-6,
         weight_decay: float = 0.0, mask: Optional[pj.MaskOrFn] = None) -> optax.GradientTransformation:
  r"""LIFT's sparse AdamW: :math:`W_S \leftarrow W_S - \eta\,(u_S + \lambda W_S)` on the principal entries S.

  References:
    Liu et al., LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for
    Reasoning-Focused Supervised Fine-Tuning, 2025.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 32))}
    >>> tx = lift(1e-3, rank=1, filter_rank=2)
    >>> tx.init(params)[0].idx["kernel"].shape     # (16 + 32) * 1 principal entries
    (48,)
  """
  return optax.chain(scale_by_lift(rank, filter_rank, update_interval, b1, b2, eps, weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


@register_optimizer("lift", options_from=lift)
def _lift_from_config(learning_rate, *, targets: str = r"layers/(attn|mlp)/.*_proj/kernel", **options):
  """`config.optim.lift`: `targets` is the regex of the sparsely trained kernels (the rest get plain Adam)."""
  return lift(learning_rate, mask=path_mask(targets), **options)
