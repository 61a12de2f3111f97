"""Per-token statistics of the output softmax without the [N, V] logits (Cut Cross-Entropy's idea).

    stats = token_stats(hidden, w, targets, chunk=4096, vocab_axis=1)
    stats["logp"], stats["logz"]          # [N]: log p(target), logsumexp of the logits
    stats["entropy"], stats["log_sum_sq"] # [N], when asked for: -sum p log p, log sum p^2

With logits z = cap(h W) (cap(a) = c tanh(a / c) under soft-capping, else the identity) and p = softmax(z):

    logz      = log sum_v exp z_v                        d/dz_v = p_v
    logp      = z_y - logz                               d/dz_v = 1[v = y] - p_v
    entropy H = logz - sum_v p_v z_v                     d/dz_v = -p_v (log p_v + H)
    log_sum_sq S = logsumexp(2 z) - 2 logz               d/dz_v = 2 (p_v^2 / sum p^2 - p_v)

The logits are made one [chunk, chunk] tile of (tokens, vocabulary) at a time. The forward pass is an online
logsumexp over vocabulary tiles (a running max m, and sum exp(z - m), sum exp(z - m) z and sum exp(2(z - m))
rescaled when m grows), so it keeps [N] numbers per statistic. The backward pass recomputes each tile from h
and W, forms dL/dz from the saved per-token statistics with the formulas above, and accumulates dh = dz W^T
and dW = h^T dz tile by tile. Temporaries are a tile plus [N] statistics and dh [N, D]: flat in the
vocabulary. (A 16-bit W is tiled by a switch over static slices: XLA:CPU computes a bf16 dynamic slice by
converting the whole operand to float32, a [D, V] copy it hoists out of the loop; see
benchmarks/results/vocab_memory.md.)

Tiles have a fixed shape. The last tile of an axis that the chunk does not divide is shifted back to end at the
axis' end (no padded copy of W or h is made), and the entries it shares with the tile before are masked out.
The weight's cotangent is only computed when the weight is differentiated (`symbolic_zeros`): a LoRA step with
a frozen head does no dW work.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

STATS = ("logp", "logz", "entropy", "log_sum_sq")


def _start(i, tile: int, size: int):
  """Offset of tile i: i * tile, shifted back so that the last tile ends at `size`."""
  return jnp.minimum(i * tile, size - tile)


def _logits(hb, wb, vocab_axis: int, softcap: Optional[float]):
  """A float32 tile of logits (the matmul in h's dtype, as the unchunked head computes it)."""
  spec = "nd,dv->nv" if vocab_axis == 1 else "nd,vd->nv"
  a = jnp.einsum(spec, hb, wb.astype(hb.dtype)).astype(jnp.float32)
  if softcap is None:
    return a, None
  t = jnp.tanh(a / softcap)
  return softcap * t, 1.0 - t * t      # z and dz/da


def weight_tile(w, j, tile: int, axis: int):
  """Tile j of W along `axis` (the last tile shifted back to end at the axis' end)."""
  V = w.shape[axis]
  n = -(-V // tile)
  if jnp.dtype(w.dtype).itemsize < 4 and n > 1:
    # A 16-bit W: XLA:CPU computes a dynamic slice of bf16 in float32 by converting the whole operand, and
    # hoists that [D, V] float32 copy out of the loop. A switch over static slices (one branch per tile)
    # converts one tile at a time; the tiles are the same.
    static = lambda k: (lambda x: jax.lax.slice_in_dim(x, min(k * tile, V - tile), min(k * tile, V - tile) + tile,
                                                       axis=axis))
    return jax.lax.switch(j, [static(k) for k in range(n)], w)
  return jax.lax.dynamic_slice_in_dim(w, _start(j, tile, V), tile, axis)


@functools.lru_cache(maxsize=None)
def _make(token_tile: int, vocab_tile: int, vocab_axis: int, softcap: Optional[float], want: tuple):
  """The custom-gradient function for one static configuration. `want`: which of entropy / log_sum_sq."""
  want_h, want_s = "entropy" in want, "log_sum_sq" in want

  def w_tile(w, j, V):
    cols = _start(j, vocab_tile, V) + jnp.arange(vocab_tile)
    return weight_tile(w, j, vocab_tile, vocab_axis), cols, cols >= j * vocab_tile

  def h_tile(x, i, N):
    start = _start(i, token_tile, N)
    return jax.lax.dynamic_slice_in_dim(x, start, token_tile, 0), start

  def forward(h, w, targets):
    N, V = h.shape[0], w.shape[vocab_axis]
    n_tok, n_voc = -(-N // token_tile), -(-V // vocab_tile)

    def token_block(i, out):
      hb, start = h_tile(h, i, N)
      yb, _ = h_tile(targets, i, N)

      def vocab_block(j, c):
        m, s, u, s2, zy = c
        wb, cols, valid = w_tile(w, j, V)
        z, _ = _logits(hb, wb, vocab_axis, softcap)
        m_new = jnp.maximum(m, jnp.where(valid, z, -jnp.inf).max(-1))
        scale = jnp.exp(m - m_new)
        e = jnp.where(valid, jnp.exp(z - m_new[:, None]), 0.0)
        s = s * scale + e.sum(-1)
        u = u * scale + (e * z).sum(-1) if want_h else u
        s2 = s2 * scale * scale + (e * e).sum(-1) if want_s else s2
        zy = zy + jnp.where(valid & (cols == yb[:, None]), z, 0.0).sum(-1)
        return m_new, s, u, s2, zy

      zeros = jnp.zeros((token_tile,), jnp.float32)
      m, s, u, s2, zy = jax.lax.fori_loop(0, n_voc, vocab_block,
                                          (jnp.full((token_tile,), -jnp.inf), zeros, zeros, zeros, zeros))
      logz = m + jnp.log(s)
      block = {"logp": zy - logz, "logz": logz}
      if want_h:
        block["entropy"] = logz - u / s
      if want_s:
        block["lse2"] = 2.0 * m + jnp.log(s2)
      # Rows a shifted last tile shares with the tile before get the same values again: plain overwrite.
      return {k: jax.lax.dynamic_update_slice_in_dim(out[k], block[k], start, 0) for k in out}

    keys = ("logp", "logz") + (("entropy",) if want_h else ()) + (("lse2",) if want_s else ())
    out = jax.lax.fori_loop(0, n_tok, token_block, {k: jnp.zeros((N,), jnp.float32) for k in keys})
    stats = {"logp": out["logp"], "logz": out["logz"]}
    if want_h:
      stats["entropy"] = out["entropy"]
    if want_s:
      stats["log_sum_sq"] = out["lse2"] - 2.0 * out["logz"]
    return stats, out

  @jax.custom_vjp
  def fn(h, w, targets):
    return forward(h, w, targets)[0]

  def fn_fwd(h, w, targets):
    stats, out = forward(h.value, w.value, targets.value)
    return stats, (h.value, w.value, targets.value, out, w.perturbed)

  def fn_bwd(res, g):
    h, w, targets, out, w_perturbed = res
    N, V = h.shape[0], w.shape[vocab_axis]
    n_tok, n_voc = -(-N // token_tile), -(-V // vocab_tile)
    real = lambda k: k in g and not isinstance(g[k], jax.custom_derivatives.SymbolicZero)
    zero = jnp.zeros((N,), jnp.float32)
    g_logp = g["logp"] if real("logp") else zero
    # dL/dz_v = g_y 1[v=y] + g_p p_v + g_h (-p_v (log p_v + H)) + g_s 2 (q_v - p_v), q = p^2 / sum p^2
    g_p = (g["logz"] if real("logz") else zero) - g_logp
    g_h = g["entropy"] if want_h and real("entropy") else None
    g_s = g["log_sum_sq"] if want_s and real("log_sum_sq") else None
    if g_s is not None:
      g_p = g_p - 2.0 * g_s

    def token_block(i, c):
      dh, dw = c
      hb, start = h_tile(h, i, N)
      yb, _ = h_tile(targets, i, N)
      rows = start + jnp.arange(token_tile) >= i * token_tile     # rows not already done by tile i - 1
      tok = lambda x: h_tile(x, i, N)[0][:, None]
      logz, gy, gp = tok(out["logz"]), tok(g_logp), tok(g_p)

      def vocab_block(j, c):
        dhb, dw = c
        wb, cols, valid = w_tile(w, j, V)
        z, dz_da = _logits(hb, wb, vocab_axis, softcap)
        logp = z - logz
        p = jnp.exp(logp)
        dz = gp * p + jnp.where(cols == yb[:, None], gy, 0.0)
        if g_h is not None:
          dz = dz - tok(g_h) * p * (logp + tok(out["entropy"]))
        if g_s is not None:
          dz = dz + 2.0 * tok(g_s) * jnp.exp(2.0 * z - tok(out["lse2"]))
        if dz_da is not None:
          dz = dz * dz_da
        dz = jnp.where(valid, dz, 0.0).astype(h.dtype)
        spec_h, spec_w = ("nv,dv->nd", "nd,nv->dv") if vocab_axis == 1 else ("nv,vd->nd", "nd,nv->vd")
        dhb = dhb + jnp.einsum(spec_h, dz, wb.astype(h.dtype), preferred_element_type=jnp.float32)
        if dw is not None:
          dzr = jnp.where(rows[:, None], dz, 0)
          tile = jnp.einsum(spec_w, hb, dzr, preferred_element_type=jnp.float32)
          start_v = _start(j, vocab_tile, V)
          dw = jax.lax.dynamic_update_slice_in_dim(
              dw, jax.lax.dynamic_slice_in_dim(dw, start_v, vocab_tile, vocab_axis) + tile, start_v, vocab_axis)
        return dhb, dw

      dhb, dw = jax.lax.fori_loop(0, n_voc, vocab_block,
                                  (jnp.zeros((token_tile, h.shape[1]), jnp.float32), dw))
      return jax.lax.dynamic_update_slice_in_dim(dh, dhb.astype(h.dtype), start, 0), dw

    dw0 = jnp.zeros(w.shape, jnp.float32) if w_perturbed else None
    dh, dw = jax.lax.fori_loop(0, n_tok, token_block, (jnp.zeros(h.shape, h.dtype), dw0))
    return dh, (dw.astype(w.dtype) if dw is not None else None), None

  fn.defvjp(fn_fwd, fn_bwd, symbolic_zeros=True)
  return fn


def token_stats(hidden, w, targets, *, chunk: int, vocab_axis: int = 1, softcap: Optional[float] = None,
                want=("logp", "logz")) -> dict:
  """Per-token statistics of softmax(cap(hidden @ W)) at `targets`, in [chunk, chunk] tiles.

  Args:
    hidden: [N, D] final hidden states (after the final norm), in the compute dtype.
    w: the output matrix, [D, V] (vocab_axis=1: an lm_head kernel) or [V, D] (vocab_axis=0: tied embeddings).
    targets: [N] int target ids.
    chunk: tile side, in tokens and in vocabulary entries.
    softcap: logits are softcap * tanh(logits / softcap) (Gemma 2's final soft-capping); None: none.
    want: the statistics to return, from `STATS` (logp and logz always come).
  Returns:
    {name: [N] float32} for logp, logz and the wanted ones among entropy, log_sum_sq.
  """
  unknown = set(want) - set(STATS)
  if unknown:
    raise ValueError(f"unknown statistics {sorted(unknown)}; valid: {STATS}")
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be positive")
  N, V = hidden.shape[0], w.shape[vocab_axis]
  extra = tuple(k for k in ("entropy", "log_sum_sq") if k in want)
  fn = _make(min(chunk, N), min(chunk, V), vocab_axis, None if softcap is None else float(softcap), extra)
  return fn(hidden, w, targets.astype(jnp.int32))


def head_outputs(model, params, tokens, positions, segment_ids, targets, needs, prefix_ids=None):
  """(logits, hidden, stats) of [N, T] rows for `losses.model_outputs`.

  stats holds logp and logz [N, T] (and log_sum_sq when "log_sum_sq_probs" is needed). With the model's
  `logits_chunk` > 0 they come from `token_stats` and logits is None; the full float32 logits are made when
  a loss needs them ("logits"), when the chunk is 0, or when the model's head is no single matrix this step
  (`output_head` returns None: an adapter on lm_head with active input dropout).
  """
  chunk = getattr(getattr(model, "config", None), "logits_chunk", 0)
  head = (model.output_head(params) if chunk and "logits" not in needs and hasattr(model, "output_head")
          else None)
  want = ("logp", "logz") + (("log_sum_sq",) if "log_sum_sq_probs" in needs else ())
  # Shared-prompt rows (`data._pref_packing`) pass prefix_ids; other models need not know the argument.
  extra = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
  if head is not None:
    _, hidden = model.apply(params, tokens, positions, segment_ids, return_hidden=True, head=False, **extra)
    N, T, D = hidden.shape
    stats = token_stats(hidden.reshape(N * T, D), head[0], targets.reshape(-1), chunk=chunk,
                        vocab_axis=head[1], want=want)
    return None, hidden, {k: v.reshape(N, T) for k, v in stats.items()}
  logits, hidden = model.apply(params, tokens, positions, segment_ids, return_hidden=True, **extra)
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  stats = {"logz": logz, "logp": target_logits - logz}
  if "log_sum_sq" in want:
    stats["log_sum_sq"] = jax.nn.logsumexp(2.0 * (logits - logz[..., None]), axis=-1)
  return logits, hidden, stats
