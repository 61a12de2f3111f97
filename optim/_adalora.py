r"""AdaLoRA's rank allocator as an optax transformation around the run's optimizer.

After the inner update, with w the updated parameters and g the step's gradient (PEFT reads `p * p.grad`
after `optimizer.step()`), for every entry of every AdaLoRA factor (Q^T = `a`, Λ = `e`, P^T = `b`):

    I = |w g|,   Ī <- β1 Ī + (1 - β1) I,   Ū <- β2 Ū + (1 - β2) |I - Ī|,   s = Ī Ū
    S_k = s(Λ_k) + mean_i s(Q_ki) + mean_j s(P_jk)            (the score of triplet k of a module)

and at allocation steps every Λ_k whose S_k is at most the (b_0 - b(t))-th smallest score over the whole
model is set to zero, b_0 = sum of init_r over the modules. The budget b(t) follows PEFT's cubic schedule
(`budget_table`): b_0 up to `tinit`, then int((b_0 - b_T)(1 - (t - tinit)/(T - tfinal - tinit))^3 + b_T)
with allocation every `deltaT` steps, then b_T = target_r x modules; at t = T - tfinal the mask is fixed
(the EMAs reset) and reapplied after every later step. The schedule is a table indexed by the step count
in the state, and the threshold is a sort of the scores, so budget changes never recompile the step.

Equal to PEFT 0.21.2's `RankAllocator.update_and_allocate(model, t)` called after each optimizer step
(`tests/test_adapters_rank_adaptive.py`). One difference: the gradient the sensitivity reads is the raw
gradient, before `config.optim.grad_clip_norm`; HF Trainer clips `p.grad` in place, so PEFT under it reads
the clipped one (equal when clipping is off or does not bind; `--config.optim.grad_clip_norm=0`).
(Zhang et al., 2023, arXiv:2303.10512.)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hooks
import peft
from optim._registry import register_adapter_transform

_FIELDS = ("a", "e", "b")


class AdaLoraState(NamedTuple):
  count: jax.Array              # (), int32: updates so far = PEFT's global_step of this update
  inner_state: optax.OptState
  ipt: tuple                    # per AdaLoRA node, (a, e, b): EMA of the sensitivity |w g|
  unc: tuple                    # per node, (a, e, b): EMA of its uncertainty
  keep: tuple                   # per node: bool [..., r], the rank pattern of the last allocation
  budget: jax.Array             # (), int32: the budget of the last update


def budget_table(init_bgt: int, target_bgt: int, total_step: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(budget int32 [T + 1], allocate bool [T + 1]) for t = 0..T: PEFT's `budget_schedule`, in float64."""
  budget = np.zeros(total_step + 1, np.int32)
  allocate = np.zeros(total_step + 1, bool)
  for t in range(total_step + 1):
    if t <= tinit:
      budget[t], allocate[t] = init_bgt, False
    elif t > total_step - tfinal:
      budget[t], allocate[t] = target_bgt, True
    else:
      mul = 1 - (t - tinit) / (total_step - tfinal - tinit)
      budget[t] = int((init_bgt - target_bgt) * (mul ** 3) + target_bgt)
      allocate[t] = t % deltaT == 0
  return budget, allocate


def _is_node(x) -> bool:
  return isinstance(x, peft.AdaLoRA)


def nodes(tree) -> list:
  """The AdaLoRA nodes of a (trainable, gradient or update) tree, in a fixed order."""
  return [l for l in jax.tree.leaves(tree, is_leaf=_is_node) if _is_node(l)]


def triplet_scores(ipt, unc) -> jax.Array:
  """[..., r] S_k of one node from its (a, e, b) EMAs (PEFT's `_combine_ipt` order: E + (A + B))."""
  s = {f: i * u for f, i, u in zip(_FIELDS, ipt, unc)}
  return s["e"] + (jnp.mean(s["a"], axis=-2) + jnp.mean(s["b"], axis=-1))


def threshold(scores: list[jax.Array], k: jax.Array) -> jax.Array:
  """The k-th smallest of all scores (torch.kthvalue), -inf for k <= 0 (nothing pruned)."""
  flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores]))
  return jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)


def rank_allocator(inner: optax.GradientTransformation, *, total_step: int, target_r: int = 8, tinit: int = 0,
                   tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85,
                   beta2: float = 0.85) -> optax.GradientTransformation:
  """`inner`, then AdaLoRA's sensitivity EMAs and budget masking of Λ (module docstring). Leaves other than
  AdaLoRA factors pass through unchanged."""
  if not 0 < beta1 < 1 or not 0 < beta2 < 1:
    raise ValueError(f"adalora: beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
  if total_step is None or total_step <= 0 or tinit >= total_step - tfinal:
    raise ValueError(f"adalora: need total_step > 0 and tinit < total_step - tfinal (a budgeting phase); "
                     f"got total_step={total_step}, tinit={tinit}, tfinal={tfinal}")
  final = total_step - tfinal

  def init_fn(params):
    ns = nodes(params)
    zeros = tuple(tuple(jnp.zeros(getattr(n, f).shape, jnp.float32) for f in _FIELDS) for n in ns)
    keep = tuple(jnp.ones(n.e.shape, bool) for n in ns)
    init_bgt = sum(int(n.e.size) for n in ns)
    return AdaLoraState(jnp.zeros((), jnp.int32), inner.init(params), zeros, zeros, keep,
                        jnp.asarray(init_bgt, jnp.int32))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("adalora's rank allocator needs params")
    updates, inner_state = inner.update(grads, state.inner_state, params)
    t = state.count
    new_p = nodes(optax.apply_updates(params, updates))
    old_p, g = nodes(params), nodes(grads)
    init_bgt = sum(int(n.e.size) for n in new_p)
    target_bgt = target_r * sum(int(np.prod(n.e.shape[:-1], dtype=np.int64)) for n in new_p)
    budgets, allocs = budget_table(init_bgt, target_bgt, total_step, tinit, tfinal, deltaT)
    tc = jnp.minimum(t, total_step)
    budget, allocate = jnp.asarray(budgets)[tc], jnp.asarray(allocs)[tc]

    learning = t < final
    ipt, unc = [], []
    for p, gr, m_old, u_old in zip(new_p, g, state.ipt, state.unc):
      mi, ui = [], []
      for f, m, u in zip(_FIELDS, m_old, u_old):
        cur = jnp.abs(getattr(p, f).astype(jnp.float32) * getattr(gr, f).astype(jnp.float32))
        m2 = beta1 * m + (1 - beta1) * cur
        u2 = beta2 * u + (1 - beta2) * jnp.abs(cur - m2)
        mi.append(jnp.where(learning, m2, m))
        ui.append(jnp.where(learning, u2, u))
      ipt.append(tuple(mi))
      unc.append(tuple(ui))

    # Allocation (PEFT's mask_to_budget) before the final phase and at its first step (force_mask); after
    # it, the fixed rank pattern is reapplied (mask_using_rank_pattern).
    reallocate = (allocate & (t < final)) | (t == final)
    scores = [triplet_scores(i, u) for i, u in zip(ipt, unc)]
    thr = threshold(scores, init_bgt - budget)
    keep = tuple(jnp.where(reallocate, s > thr, k) for s, k in zip(scores, state.keep))
    masking = reallocate | (t > final)
    new_e = iter([jnp.where(masking & ~k, -p.e, u.e) for k, p, u in zip(keep, old_p, nodes(updates))])
    updates = jax.tree.map(lambda u: u.replace(e=next(new_e)) if _is_node(u) else u, updates, is_leaf=_is_node)

    reset = t == final     # PEFT's reset_ipt once the pattern is fixed
    ipt = tuple(tuple(jnp.where(reset, 0.0, x) for x in i) for i in ipt)
    unc = tuple(tuple(jnp.where(reset, 0.0, x) for x in u) for u in unc)
    return updates, AdaLoraState(t + 1, inner_state, ipt, unc, keep, budget.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


@register_adapter_transform("adalora")
def adalora_allocator(config, trainable, tx):
  """The run's optimizer with AdaLoRA's allocator; options from `config.peft.options` (PEFT's names),
  total_step defaults to `config.total_steps`."""
  del trainable
  opts = dict(peft.adalora_options(config.peft.get("options") or {}))
  total = opts["total_step"] or int(config.total_steps)
  return rank_allocator(tx, total_step=int(total), target_r=int(opts["target_r"]), tinit=int(opts["tinit"]),
                        tfinal=int(opts["tfinal"]), deltaT=int(opts["deltaT"]), beta1=float(opts["beta1"]),
                        beta2=float(opts["beta2"]))


def budget_of(opt_state) -> Any:
  """(budget, ranks per node) from a run's optimizer state holding an AdaLoraState, else None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
           if isinstance(s, AdaLoraState)]
  if not found:
    return None
  s = found[0]
  return s.budget, [jnp.sum(k, axis=-1) for k in s.keep]


@hooks.register_hook("adalora_budget", enabled=lambda config: (config.get("peft") or {}).get("method") == "adalora")
def adalora_budget_hook(config, model) -> hooks.HostHook:
  """Logs `adalora/budget` (the budget of the last step) and `adalora/rank` (the triplets kept) every
  `log_every_steps`; it changes nothing (the allocation itself runs in the step)."""
  del model

  def refresh(step, state, frozen, tx):
    del step, tx
    found = budget_of(state.opt_state)
    if found is None:
      return state, frozen
    budget, ranks = found
    return state, frozen, {"adalora/budget": int(budget), "adalora/rank": int(sum(int(r.sum()) for r in ranks))}

  return hooks.HostHook(every=int(config.get("log_every_steps", 10)), refresh=refresh)
