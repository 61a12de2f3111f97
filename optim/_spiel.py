r"""SpIEL: sparse fine-tuning at a fixed density, by update, prune and regrow of (index, delta) pairs.

Ansell et al., *Scaling Sparse Fine-Tuning to Large Language Models*, 2024 (arXiv:2401.16405); reference code
`AlanAnsell/peft: src/peft/tuners/sft/` (`trainer.py: SftSelector`, `optimizer.py: SftAdamW`, `layer.py`).

Each selected matrix W (m x n, with leading layer axes one set per layer) trains k = floor(density * m n)
entries: indices :math:`\iota` [k] and deltas :math:`\eta` [k], W = W0 + scatter(:math:`\iota`, :math:`\eta`).
Here, as LIFT (`optim/_lift.py`), the weight itself is the parameter and the optimizer state holds the pairs:
the indices, the anchor W0[:math:`\iota`] (so :math:`\eta` = W[:math:`\iota`] - anchor), and Adam's moments
for them only. Nothing outside :math:`\iota` ever moves.

**Update.** Adam on the gathered gradient with a per-entry age (SftAdamW):

.. math::

  m \leftarrow \beta_1 m + (1-\beta_1) g_\iota,\quad v \leftarrow \beta_2 v + (1-\beta_2) g_\iota^2,\quad
  \eta \leftarrow \eta - \mathrm{lr}\,\frac{\sqrt{1-\beta_2^{a}}}{1-\beta_1^{a}}\frac{m}{\sqrt v+\epsilon},
  \quad \eta \leftarrow (1 - \mathrm{lr}\,\lambda)\,\eta,\quad a \leftarrow a + 1

(decoupled decay of the delta, i.e. towards W0, as SftAdamW decays its `values`).

**Schedule** (SftSelector, c = steps done after this one, R = `reselection_steps`, A =
`selection_accumulation_steps`, T = `total_steps`): the gradients of the steps with c mod R <= A are
accumulated (the first phase: c = 1..A); after the step with c mod R = A and c <= T, a fraction p of the
pairs is replaced: p = 1 at the first selection (c = A) and :math:`p = \rho_0 (1 - c/T)` after (`linear`,
:math:`\rho_0` = `initial_reselection_rate`), or :math:`\rho_0 (1 + \cos(\pi c/T))/2` (`cosine`).
n = floor(k p). Every decision is a `lax.cond` / mask on the count: the step never recompiles.

**Prune and regrow** (`regrow="gradient"`, SpIEL-AG, the reference's `rigl` default):
1. candidates: the k positions of largest |g| in the first gradient of the phase; their gradients (and
   squares) are summed over the phase;
2. outgoing: the n pairs of smallest :math:`|\eta|`;
3. incoming: the min(n, #valid) candidates of largest |summed gradient|, among candidates that are not a
   remaining (current, not outgoing) position;
4. an outgoing position that is also incoming keeps its slot untouched (delta and moments); the other
   outgoing slots, by increasing :math:`|\eta|`, take the other incoming positions, by decreasing score,
   as many as there are (so the count k never changes);
5. a replaced slot drops its delta (W returns to its anchor there), its new position starts at delta 0 with
   moments seeded from the phase's mean gradient g-bar and mean square, counter-biased for Adam's bias
   correction: m = g-bar (1 - b1^a), v = mean(g^2) (1 - b2^a), age a = phase length.

`regrow="momentum"` (SpIEL-MA): the reference trains the deltas with SM3 and ranks every non-current position
by the outer product of SM3's row and column accumulators. Here the deltas keep Adam, and row/column SM3-II
covers of the *dense* gradient are kept for the ranking (:math:`\nu_{ij} = \min(r_i, c_j) + g_{ij}^2`,
:math:`r_i = \max_j \nu_{ij}`, :math:`c_j = \max_i \nu_{ij}`, every step); entering entries start with zero
moments and age 1 (our choice). No candidate accumulation phase is needed then.

Known differences (our choices): the initial indices are a uniform random subset from `seed` (the reference's
`random_subset`, another generator); p and n are computed in float32; a reset to the anchor is
W + (anchor - W), exact to one rounding.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optim import _projector as pj
from optim._registry import path_mask, register_optimizer

REGROW = ("gradient", "momentum")
POLICIES = ("linear", "cosine")


class SpielState(NamedTuple):
  count: jax.Array        # (), int32: steps done
  samples: jax.Array      # (), int32: gradients accumulated in the current selection phase
  idx: optax.Params       # per sparse leaf [..., k] int32 flat indices into in*out; MaskedNode elsewhere
  anchor: optax.Params    # [..., k] W0 at idx (delta = W[idx] - anchor); MaskedNode elsewhere
  age: optax.Params       # [..., k] float32 per-entry Adam age; MaskedNode elsewhere
  mu: optax.Updates       # [..., k]; the leaf's shape elsewhere (plain Adam)
  nu: optax.Updates
  cand: optax.Params      # [..., k] int32 growth candidates of the phase (gradient); MaskedNode otherwise
  cand_g: optax.Params    # [..., k] summed gradients at the candidates
  cand_g2: optax.Params   # [..., k] summed squared gradients
  row: optax.Params       # [..., in] SM3 row covers (momentum); MaskedNode otherwise
  col: optax.Params       # [..., out] SM3 column covers


def num_deltas(shape, density: float) -> int:
  """k = floor(density * in * out) per matrix [..., in, out], at least 1."""
  return max(1, int(density * shape[-2] * shape[-1]))


def random_indices(key, shape, k: int) -> jax.Array:
  """[..., k] int32 ascending: a uniform random k-subset of each matrix's in*out entries."""
  lead, numel = tuple(shape[:-2]), shape[-2] * shape[-1]
  scores = jax.random.uniform(key, lead + (numel,))
  return jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1).astype(jnp.int32)


def reselection_rate(c, initial_rate: float, first: int, total_steps: Optional[int], policy: str):
  """p at the selection after step c (1 at the first selection, c == first, under `linear`)."""
  c = jnp.asarray(c, jnp.float32)
  if total_steps is None:                                # no horizon: the rate never decays
    return jnp.where(c == first, 1.0, initial_rate) if policy == "linear" else jnp.asarray(initial_rate)
  if policy == "linear":
    return jnp.where(c == first, 1.0, initial_rate * (1.0 - c / total_steps))
  return initial_rate * (1.0 + jnp.cos(math.pi * c / total_steps)) / 2.0


def _member(x, sorted_set):
  pos = jnp.clip(jnp.searchsorted(sorted_set, x), 0, sorted_set.shape[0] - 1)
  return sorted_set[pos] == x


def prune_regrow(idx, delta, cand, score, n, numel: int):
  """One matrix: (new idx [k], changed [k] bool, source [k]: the candidate slot each changed slot takes).

  idx [k] current positions, delta [k] their deltas, cand [k] candidate positions (distinct), score [k] their
  scores (larger grows first; -inf: never), n the number of pairs to replace (module docstring, steps 2-4)."""
  k = idx.shape[0]
  ar = jnp.arange(k)
  big = jnp.asarray(numel, idx.dtype)                    # no position equals it
  order = jnp.argsort(jnp.abs(delta), stable=True)       # smallest |delta| first
  rank_slot = jnp.zeros(k, jnp.int32).at[order].set(ar.astype(jnp.int32))
  out = rank_slot < n
  remaining = jnp.sort(jnp.where(out, big, idx))
  valid = ~_member(cand, remaining) & jnp.isfinite(score)
  s = jnp.where(valid, jnp.abs(score), -jnp.inf)
  order_c = jnp.argsort(-s, stable=True)                 # largest score first, invalid last
  rank_c = jnp.zeros(k, jnp.int32).at[order_c].set(ar.astype(jnp.int32))
  selected = valid & (rank_c < n)
  outgoing = jnp.sort(jnp.where(out, idx, big))
  truly_in = selected & ~_member(cand, outgoing)
  chosen = jnp.sort(jnp.where(selected, cand, big))
  changing = out & ~_member(idx, chosen)                 # outgoing and not grown back
  m = jnp.sum(truly_in)
  slots = jnp.argsort(jnp.where(changing, rank_slot, k + rank_slot))    # changing slots, smallest |delta| first
  source = jnp.argsort(jnp.where(truly_in, rank_c, k + rank_c))         # incoming candidates, best first
  take = ar < m
  new_idx = idx.at[slots].set(jnp.where(take, cand[source], idx[slots]))
  changed = jnp.zeros(k, bool).at[slots].set(take)
  src = jnp.zeros(k, jnp.int32).at[slots].set(source.astype(jnp.int32))
  return new_idx, changed, src


def _flat(x):
  return x.reshape(x.shape[:-2] + (-1,))


def _gather(x, idx):
  return jnp.take_along_axis(_flat(x), idx, axis=-1)


def _scatter(values, idx, shape, dtype):
  lead = jnp.indices(idx.shape)[:-1]
  flat = jnp.zeros(idx.shape[:-1] + (shape[-2] * shape[-1],), dtype)
  return flat.at[(*lead, idx)].set(values.astype(dtype)).reshape(shape)


def _vmap_lead(fn, ndim_lead: int):
  for _ in range(ndim_lead):
    fn = jax.vmap(fn)
  return fn


def sm3_covers(row, col, g):
  """SM3-II: nu = min(row_i, col_j) + g^2; row = max_j nu, col = max_i nu (leading axes batched)."""
  nu = jnp.minimum(row[..., :, None], col[..., None, :]) + g.astype(jnp.float32) ** 2
  return jnp.max(nu, axis=-1), jnp.max(nu, axis=-2)


def spiel(learning_rate: optax.ScalarOrSchedule, density: float = 0.01, reselection_steps: int = 20,
          selection_accumulation_steps: int = 5, initial_reselection_rate: float = 0.2,
          reselection_rate_policy: str = "linear", regrow: str = "gradient", total_steps: Optional[int] = None,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0,
          mask: Optional[pj.MaskOrFn] = None) -> optax.GradientTransformation:
  r"""SpIEL's sparse AdamW with prune and regrow (module docstring); the learning rate is applied inside.

  The resets of pruned entries are exact (delta -> 0), not directions, so there is no `scale_by_spiel`: the
  transform returns the final updates, and must come last in a chain.

  Args:
    density: fraction of each selected matrix's entries that train (k = floor(density * in * out)).
    reselection_steps: R, steps between selections.
    selection_accumulation_steps: A, the phase length (gradient regrow) and the first selection's step.
    initial_reselection_rate: rho_0 of the replaced-fraction schedule.
    reselection_rate_policy: 'linear' (the reference default) or 'cosine'.
    regrow: 'gradient' (SpIEL-AG, accumulated gradients) or 'momentum' (SpIEL-MA, SM3 covers).
    total_steps: T; no selection after it. The reference always has one (its trainer's max_steps); None
      (for a run that does not say) keeps p at `initial_reselection_rate` and never stops reselecting.
    b1, b2, eps, weight_decay: SftAdamW's (HF Trainer defaults; decay of the deltas).
    seed: of the initial random index sets.
    mask: which leaves are sparse (bool tree or params -> bool tree); default every kernel. The other leaves
      get the same Adam densely.

  References:
    Ansell et al., Scaling Sparse Fine-Tuning to Large Language Models, 2024.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.zeros((16, 32))}
    >>> tx = spiel(1e-3, density=0.125, total_steps=100)
    >>> tx.init(params).idx["kernel"].shape     # 0.125 * 16 * 32 pairs
    (64,)
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"spiel: density must be in (0, 1], got {density!r}")
  if regrow not in REGROW:
    raise ValueError(f"spiel: regrow={regrow!r}; valid: {', '.join(REGROW)}")
  if reselection_rate_policy not in POLICIES:
    raise ValueError(f"spiel: reselection_rate_policy={reselection_rate_policy!r}; valid: {', '.join(POLICIES)}")
  if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
    raise ValueError(f"spiel: total_steps must be a positive int (the run's steps) or None, got {total_steps!r}")
  if not 1 <= selection_accumulation_steps < reselection_steps:
    raise ValueError(f"spiel: need 1 <= selection_accumulation_steps < reselection_steps, got "
                     f"{selection_accumulation_steps} and {reselection_steps}")
  R, A = int(reselection_steps), int(selection_accumulation_steps)
  by_gradient = regrow == "gradient"

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    flags = pj.resolve_mask(params, mask, "spiel")
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    fields = {f: [] for f in SpielState._fields[2:]}
    masked = optax.MaskedNode()
    for x, on, key in zip(leaves, flags, keys):
      if on:
        k = num_deltas(x.shape, density)
        idx = random_indices(key, x.shape, k)
        zeros = jnp.zeros(idx.shape, jnp.float32)
        vals = dict(idx=idx, anchor=_gather(x, idx), age=jnp.ones(idx.shape, jnp.float32), mu=zeros, nu=zeros,
                    cand=idx if by_gradient else masked, cand_g=zeros if by_gradient else masked,
                    cand_g2=zeros if by_gradient else masked,
                    row=masked if by_gradient else jnp.zeros(x.shape[:-1], jnp.float32),
                    col=masked if by_gradient else jnp.zeros(x.shape[:-2] + x.shape[-1:], jnp.float32))
      else:
        vals = {f: masked for f in fields}
        vals.update(mu=jnp.zeros_like(x), nu=jnp.zeros_like(x))
      for f in fields:
        fields[f].append(vals[f])
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    zero = jnp.zeros([], jnp.int32)
    return SpielState(zero, zero, **{f: unflat(v) for f, v in fields.items()})

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("spiel needs params (the deltas are W[idx] - anchor)")
    leaves, treedef = jax.tree.flatten(updates)
    rest = {f: treedef.flatten_up_to(getattr(state, f)) for f in SpielState._fields[2:]}
    ws = treedef.flatten_up_to(params)
    count = state.count
    c = count + 1                                        # steps done after this one
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    in_phase = by_gradient & (c % R <= A)
    select = (c % R == A) & (c <= (total_steps or jnp.iinfo(jnp.int32).max))
    p = reselection_rate(c, initial_reselection_rate, A, total_steps, reselection_rate_policy)
    out = []
    new = {f: [] for f in rest}
    for i, (g, w) in enumerate(zip(leaves, ws)):
      s = {f: rest[f][i] for f in rest}
      if isinstance(s["idx"], optax.MaskedNode):
        mu, nu = pj.update_moments(g, s["mu"], s["nu"], b1, b2)
        u = -lr * pj.hf_adam(mu, nu, c, b1, b2, eps)
        if weight_decay:
          u = u - lr * weight_decay * w
        out.append(u.astype(g.dtype))
        s.update(mu=mu, nu=nu)
      else:
        out.append(_sparse_leaf(g, w, s, lr, in_phase, select, p, state.samples))
      for f in rest:
        new[f].append(s[f])
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    samples = jnp.where(select, 0, jnp.where(in_phase, state.samples + 1, state.samples))
    return unflat(out), SpielState(optax.safe_increment(count), samples.astype(jnp.int32),
                                   **{f: unflat(v) for f, v in new.items()})

  def _sparse_leaf(g, w, s, lr, in_phase, select, p, samples):
    """The step of one sparse leaf; updates `s` (its state fields) in place, returns the dense update."""
    idx, anchor, age = s["idx"], s["anchor"], s["age"]
    k, numel = idx.shape[-1], g.shape[-2] * g.shape[-1]
    gs = _gather(g, idx).astype(jnp.float32)
    mu = b1 * s["mu"] + (1 - b1) * gs
    nu = b2 * s["nu"] + (1 - b2) * gs * gs
    w_sel = _gather(w, idx).astype(jnp.float32)
    delta = w_sel - anchor
    bc1, bc2 = pj.bias_corrections(age, b1, b2)     # accurate in float32 (0.999 is not a float32)
    delta_new = delta - lr * mu * jnp.sqrt(bc2) / (bc1 * (jnp.sqrt(nu) + eps))
    if weight_decay:
      delta_new = delta_new * (1.0 - lr * weight_decay)
    age = age + 1.0
    lead = idx.ndim - 1

    if by_gradient:
      def accumulate(cand, cg, cg2):
        def first():
          c_new = jax.lax.top_k(jnp.abs(_flat(g)).astype(jnp.float32), k)[1].astype(jnp.int32)
          gc = _gather(g, c_new).astype(jnp.float32)
          return c_new, gc, gc * gc
        def more():
          gc = _gather(g, cand).astype(jnp.float32)
          return cand, cg + gc, cg2 + gc * gc
        return jax.lax.cond(samples == 0, first, more)
      cand, cg, cg2 = jax.lax.cond(in_phase, accumulate, lambda *a: a, s["cand"], s["cand_g"], s["cand_g2"])
      s.update(cand=cand, cand_g=cg, cand_g2=cg2)
    else:
      row, col = sm3_covers(s["row"], s["col"], g)
      s.update(row=row, col=col)

    n = jnp.floor(k * p).astype(jnp.int32)

    def reselect(idx, delta_new, mu, nu, age):
      if by_gradient:
        cand, score = s["cand"], s["cand_g"]
        n_acc = jnp.maximum(samples + 1, 1).astype(jnp.float32)     # this step's gradient is included
        c1, c2 = pj.bias_corrections(n_acc, b1, b2)
        seed_mu = s["cand_g"] / n_acc * c1
        seed_nu = s["cand_g2"] / n_acc * c2
        seed_age = jnp.broadcast_to(n_acc, cand.shape)
      else:
        est = (s["row"][..., :, None] * s["col"][..., None, :]).reshape(idx.shape[:-1] + (numel,))
        lead_ix = jnp.indices(idx.shape)[:-1]
        est = est.at[(*lead_ix, idx)].set(-jnp.inf)                   # current positions never grow
        score, cand = jax.lax.top_k(est, k)
        cand = cand.astype(jnp.int32)
        seed_mu = seed_nu = jnp.zeros(cand.shape, jnp.float32)
        seed_age = jnp.ones(cand.shape, jnp.float32)
      fn = _vmap_lead(lambda i, d, cc, sc: prune_regrow(i, d, cc, sc, n, numel), lead)
      new_idx, changed, src = fn(idx, delta_new, cand, score)
      take = lambda x: jnp.take_along_axis(x, src, axis=-1)
      return (new_idx, changed, jnp.where(changed, take(seed_mu), mu), jnp.where(changed, take(seed_nu), nu),
              jnp.where(changed, take(seed_age), age))

    keep = lambda idx, delta_new, mu, nu, age: (idx, jnp.zeros(idx.shape, bool), mu, nu, age)
    new_idx, changed, mu, nu, age = jax.lax.cond(select, reselect, keep, idx, delta_new, mu, nu, age)
    # The update at the old positions: the Adam step, or back to the anchor where the pair was replaced.
    u = _scatter(jnp.where(changed, anchor - w_sel, delta_new - delta), idx, g.shape, g.dtype)
    # Entering positions were never touched: their current value is their anchor (delta 0).
    new_anchor = jnp.where(changed, _gather(w, new_idx).astype(jnp.float32), anchor)
    s.update(idx=new_idx, anchor=new_anchor, mu=mu, nu=nu, age=age)
    return u

  return optax.GradientTransformation(init_fn, update_fn)


@register_optimizer("spiel", options_from=spiel)
def _spiel_from_config(learning_rate, *, targets: str = r"layers/(attn|mlp)/.*_proj/kernel", **options):
  """`config.optim.spiel`: `targets` is the regex of the sparsely trained kernels (the rest get plain Adam)."""
  return spiel(learning_rate, mask=path_mask(targets), **options)
