r"""IncreLoRA's rank growth: module-score EMAs in the step (an optax wrapper) and the growth on the host.

In the step, with S the gradient of each node's `probe` (the module score, see `peft/_increlora.py`):

    Ī <- β1 Ī + (1 - β1) S,     Ū <- β2 Ū + (1 - β2) |S - Ī|

and the probe's update is zero. Between steps, every `incre_interval` steps after `init_warmup` while the
model holds fewer than `target_r` ranks per module on average, the host hook `increlora` takes the
min(top_h, budget left) largest scores Ī·Ū, and each module at or above that threshold turns its `add_r`
reserve ranks into used ones (their singular value starts at the reserve's 1e-5) and opens the next `add_r`
as reserves, while its capacity `max_r` allows; at the target the reserves close. The masks are frozen
arrays of the same shape, so the step never recompiles.

Ours: the hook at step t decides on the scores through step t - 1 (the reference decides at t, before that
step's optimizer update, so its new ranks take that step's update); a module at capacity is skipped.
(Zhang et al., 2023, arXiv:2308.12043; FeiyuZhang98/IncreLoRA `RankAllocator.update_and_increase`.)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hooks
import peft
from optim._registry import register_adapter_transform


class IncreLoraState(NamedTuple):
  count: jax.Array              # (), int32
  inner_state: optax.OptState
  ipt: tuple                    # per IncreLoRA node: [...] EMA of the module score
  unc: tuple                    # per node: [...] EMA of its uncertainty


def _is_node(x) -> bool:
  return isinstance(x, peft.IncreLoRA)


def nodes(tree) -> list:
  return [l for l in jax.tree.leaves(tree, is_leaf=_is_node) if _is_node(l)]


def score_emas(inner: optax.GradientTransformation, beta1: float = 0.85,
               beta2: float = 0.85) -> optax.GradientTransformation:
  """`inner`, plus the EMAs of every IncreLoRA node's probe gradient; probes never move."""
  def init_fn(params):
    z = tuple(jnp.zeros(n.probe.shape, jnp.float32) for n in nodes(params))
    return IncreLoraState(jnp.zeros((), jnp.int32), inner.init(params), z, z)

  def update_fn(grads, state, params=None):
    ipt, unc = [], []
    for g, m, u in zip(nodes(grads), state.ipt, state.unc):
      s = g.probe.astype(jnp.float32)
      m = beta1 * m + (1 - beta1) * s
      ipt.append(m)
      unc.append(beta2 * u + (1 - beta2) * jnp.abs(s - m))
    # The scores are no gradients: the inner optimizer (and its global-norm clipping) sees zeros there.
    no_probe = lambda t: jax.tree.map(lambda u: u.replace(probe=jnp.zeros_like(u.probe)) if _is_node(u) else u,
                                      t, is_leaf=_is_node)
    updates, inner_state = inner.update(no_probe(grads), state.inner_state, params)
    updates = no_probe(updates)
    return updates, IncreLoraState(state.count + 1, inner_state, tuple(ipt), tuple(unc))

  return optax.GradientTransformation(init_fn, update_fn)


def grow(frozen_nodes: list, params_nodes: list, scores: list, *, target_r: int, top_h: int, add_r: int,
         advance_learn: bool = True):
  """One growth round on host arrays: (new frozen nodes, new trainable nodes, modules grown).

  frozen_nodes carry `used`/`reserve` [..., R], params_nodes `e` [..., R], scores [...] per node."""
  used = [np.asarray(n.used, np.float32).copy() for n in frozen_nodes]
  reserve = [np.asarray(n.reserve, np.float32).copy() for n in frozen_nodes]
  es = [np.asarray(p.e).copy() for p in params_nodes]
  modules = sum(int(np.prod(u.shape[:-1], dtype=np.int64)) for u in used)
  total = int(sum(u.sum() for u in used))
  target = target_r * modules
  grown = 0
  if total < target:
    flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores])
    k = min(top_h, target - total, flat.size)
    thr = np.sort(flat)[::-1][k - 1]
    for u, res, e, s in zip(used, reserve, es, scores):
      R = u.shape[-1]
      u2, r2, e2 = u.reshape(-1, R), res.reshape(-1, R), e.reshape(-1, R)
      for m, sm in enumerate(np.asarray(s, np.float64).reshape(-1)):
        n_used = int(u2[m].sum())
        if sm < thr or n_used + add_r > R:
          continue
        slots = np.arange(n_used, n_used + add_r)
        u2[m, slots] = 1.0
        e2[m, slots] = peft.increlora_reserve_e if advance_learn else 0.0
        r2[m] = 0.0
        nxt = np.arange(n_used + add_r, min(n_used + 2 * add_r, R))
        if advance_learn:
          r2[m, nxt] = 1.0
        total += add_r
        grown += 1
    if total >= target:
      for r in reserve:
        r[...] = 0.0
  new_frozen = [n.replace(used=jnp.asarray(u), reserve=jnp.asarray(r)) for n, u, r in zip(frozen_nodes, used, reserve)]
  new_params = [p.replace(e=jnp.asarray(e, p.e.dtype)) for p, e in zip(params_nodes, es)]
  return new_frozen, new_params, grown


def _replace_nodes(tree, new):
  it = iter(new)
  return jax.tree.map(lambda n: next(it) if _is_node(n) else n, tree, is_leaf=_is_node)


def _state_of(opt_state):
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, IncreLoraState))
           if isinstance(s, IncreLoraState)]
  return found[0]


@register_adapter_transform("increlora")
def increlora_optimizer(config, trainable, tx):
  del trainable
  o = peft.increlora_options(config.peft.get("options") or {})
  return score_emas(tx, float(o["beta1"]), float(o["beta2"]))


@hooks.register_hook("increlora", enabled=lambda config: (config.get("peft") or {}).get("method") == "increlora")
def increlora_hook(config, model) -> hooks.HostHook:
  del model
  o = peft.increlora_options(config.peft.get("options") or {})
  interval, warmup = int(o["incre_interval"]), int(o["init_warmup"])

  def refresh(step, state, frozen, tx):
    del tx
    if step <= warmup or step % interval:
      return state, frozen
    s = _state_of(state.opt_state)
    scores = [np.asarray(i) * np.asarray(u) for i, u in zip(s.ipt, s.unc)]
    new_f, new_p, grown = grow(nodes(frozen), nodes(state.params), scores, target_r=int(o["target_r"]),
                               top_h=int(o["top_h"]), add_r=int(o["add_r"]), advance_learn=bool(o["advance_learn"]))
    frozen2 = peft.place_like(_replace_nodes(frozen, new_f), frozen)
    params2 = peft.place_like(_replace_nodes(state.params, new_p), state.params)
    ranks = sum(float(jnp.sum(n.used)) for n in new_f)
    return state._replace(params=params2), frozen2, {"increlora/total_rank": ranks, "increlora/grown": grown}

  return hooks.HostHook(every=1, refresh=refresh, mutates_frozen=True)
