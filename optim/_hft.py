r"""HFT (Hui et al., *HFT: Half Fine-Tuning for Large Language Models*, arXiv 2404.18466): full fine-tuning
in which each stage of `interval_steps` steps freezes a random half of the parameter matrices.

There is no official code; we use the rule of METHODS C5 (a third-party reading, unverified against the
paper): in every block 2 of the 4 attention matrices {q, k, v, o} train, and 2 of the 3 MLP matrices
{gate, up, down} train in a random floor(L/2) of the blocks and 1 of 3 in the others; a bias follows its
kernel; embeddings, norms and the head always train. The mask (bool [L] per layer kernel) lives in the `hft`
transform's state and is redrawn on the host per stage; frozen matrices get their gradients zeroed before
the inner optimizer (and before `clip_norm`, so clipping sees only the trained half, as torch does with
`requires_grad=False`), exactly zero updates, and an unchanged inner state (the inner state's
parameter-shaped trees keep their old values where frozen; the shared step count advances).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hooks
from optim._registry import register_optimizer
from optim._sampling import SamplingConfig, one_level, sampling_check
from peft import path_str, place_like


class HFTState(NamedTuple):
  mask: optax.Params           # per leaf: bool [L] for a layer kernel/bias HFT may freeze, bool () elsewhere
  inner_state: optax.OptState


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_HFT_LEAF = re.compile(r"layers/(attn|mlp)/(\w+_proj)/(kernel|bias)")


def hft_selection(seed: int, step: int, num_layers: int) -> dict[str, np.ndarray]:
  """{matrix name: bool [L] trained} for the stage starting at `step` (the rule in the module docstring)."""
  rng = np.random.default_rng((int(seed), int(step)))
  L = num_layers
  out = {n: np.zeros(L, bool) for n in _ATTN + _MLP}
  two_mlp = np.zeros(L, bool)
  two_mlp[rng.choice(L, size=L // 2, replace=False)] = True
  for l in range(L):
    for n in rng.choice(len(_ATTN), size=2, replace=False):
      out[_ATTN[n]][l] = True
    for n in rng.choice(len(_MLP), size=2 if two_mlp[l] else 1, replace=False):
      out[_MLP[n]][l] = True
  return out


def hft_mask(params):
  """The initial HFTState mask of `params`: bool [L] ones for the stacked layer matrices HFT may freeze (and
  their biases), a scalar True elsewhere."""
  def one(path, x):
    if _HFT_LEAF.fullmatch(path_str(path)) is None or jnp.ndim(x) < 2:
      return jnp.ones((), bool)
    return jnp.ones(x.shape[:1], bool)
  return jax.tree_util.tree_map_with_path(one, params)


def redraw_mask(mask, selection: dict[str, np.ndarray]):
  """A mask of the same structure with the layer matrices' entries from `hft_selection`."""
  def one(path, m):
    match = _HFT_LEAF.fullmatch(path_str(path))
    return m if match is None or jnp.ndim(m) != 1 else jnp.asarray(selection[match.group(2)])
  return jax.tree_util.tree_map_with_path(one, mask)


def _select(mask, new, old):
  m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(new) - mask.ndim))
  return jnp.where(m, new, old)


def _keep_frozen(new, old, mask, params_def):
  """`new` inner state with its parameter-shaped trees set back to `old` where the mask is False."""
  if jax.tree.structure(new) == params_def:
    return jax.tree.map(
        lambda n, o, m: _select(m, n, o) if np.shape(n)[:np.ndim(m)] == np.shape(m) else n, new, old, mask)
  children, treedef = one_level(new)
  if jax.tree_util.treedef_is_leaf(treedef) or not children:
    return new
  return treedef.unflatten([_keep_frozen(n, o, mask, params_def)
                            for n, o in zip(children, treedef.flatten_up_to(old))])


def hft(inner: optax.GradientTransformation, clip_norm: float = 0.0) -> optax.GradientTransformation:
  """Half fine-tuning around `inner`: masked matrices get zero gradients, zero updates and a frozen inner
  state. `clip_norm` > 0 clips the global norm of the masked gradient first. The mask starts all-True; the
  `hft` host hook redraws it per stage."""
  def init_fn(params):
    return HFTState(hft_mask(params), inner.init(params))

  def update_fn(updates, state, params=None):
    grads = jax.tree.map(lambda g, m: _select(m, g, jnp.zeros_like(g)), updates, state.mask)
    if clip_norm:
      norm = optax.global_norm(grads)
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip_norm / (norm + 1e-12)).astype(g.dtype), grads)
    out, inner_state = inner.update(grads, state.inner_state, params)
    out = jax.tree.map(lambda u, m: _select(m, u, jnp.zeros_like(u)), out, state.mask)
    inner_state = _keep_frozen(inner_state, state.inner_state, state.mask, jax.tree.structure(updates))
    return out, HFTState(state.mask, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


@register_optimizer("hft")
def _hft_from_config(learning_rate, *, inner: str = "adamw", clip_norm: float = 0.0, build):
  """`config.optim.hft`: the inner optimizer (its options in its own section) and the clipping norm of the
  trained half."""
  del learning_rate   # the inner optimizer has it
  if inner == "hft":
    raise ValueError("config.optim.hft.inner cannot be 'hft'")
  return hft(build(inner), clip_norm=clip_norm)


def set_hft_selection(opt_state, selection: dict[str, np.ndarray]):
  """opt_state with the mask of every HFTState inside redrawn (same shapes and shardings)."""
  is_hft = lambda x: isinstance(x, HFTState)
  return jax.tree.map(lambda s: s._replace(mask=place_like(redraw_mask(s.mask, selection), s.mask)) if is_hft(s) else s,
                      opt_state, is_leaf=is_hft)


@hooks.register_hook("hft", enabled=lambda config: (config.get("sampling") or {}).get("method") == "hft")
def _hft_hook(config, model) -> hooks.HostHook:
  L = model.config.num_layers
  sc = SamplingConfig.from_config(config, L)
  oc = config.optim
  names = {oc.name} | {r[1] for r in (oc.get("rules", None) or ())}
  sampling_check("hft" in names, "method='hft' needs config.optim.name='hft' (its inner optimizer is "
                 "config.optim.hft.inner), which holds the per-stage mask")
  sampling_check(not oc.get("grad_clip_norm", 0.0), "with HFT set config.optim.grad_clip_norm=0 and clip "
                 "with config.optim.hft.clip_norm (formerly config.optim.hft_clip_norm) instead: the clipping norm "
                 "must see only the trained half")
  seed = int(config.seed)

  def refresh(step, state, frozen, tx):
    del tx
    selection = hft_selection(seed, step, L)
    return state._replace(opt_state=set_hft_selection(state.opt_state, selection)), frozen

  return hooks.HostHook(every=sc.interval_steps, refresh=refresh)
