"""A decoder-only LM as pure functions over a plain parameter dict.

    model = Decoder(DecoderConfig.tiny())
    params = model.init(jax.random.PRNGKey(0))
    logits = model.apply(params, tokens, positions, segment_ids)        # [B, T, V]

Parameter paths ('/'-joined; adapter targets, sharding rules and HT-SR reports name them):

    embed/embedding                    [V, D]
    layers/attn_norm/scale             [L, D]
    layers/attn/{q,k,v}_proj/kernel    [L, D, H*hd] / [L, D, KV*hd]    (+ bias [L, ...] with qkv_bias)
    layers/attn/o_proj/kernel          [L, H*hd, D]
    layers/mlp_norm/scale              [L, D]
    layers/mlp/{gate,up}_proj/kernel   [L, D, F]
    layers/mlp/down_proj/kernel        [L, F, D]
    final_norm/scale                   [D]
    lm_head/kernel                     [D, V]                           (absent with tie_embeddings)

Kernels are `[in, out]` (the transpose of torch's `nn.Linear.weight`). Layers are stacked on a leading
axis and run under `lax.scan` with a configurable remat policy, so compile time does not grow with depth.
The model is written as plain functions rather than `nn.Module`s because adapters are pytree nodes that
stand in for kernels: every matmul goes through `peft.dot`, which a Flax module's parameter handling would
hide.

Masking is by slot index, not by RoPE position: packed rows restart positions per document, and the
segment ids keep documents from attending to each other (segment 0 is padding). The KV cache uses the same
rule, so a left-padded batch decodes with the pad slots masked out.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import losses
import peft
from models._config import DecoderConfig

Params = Any


class Cache(NamedTuple):
  """KV cache of all layers. Slots [0, index) are filled."""
  k: jax.Array            # [L, B, S, KV, hd]
  v: jax.Array            # [L, B, S, KV, hd]
  segment_ids: jax.Array  # [B, S] int32; 0 = empty or padding
  index: jax.Array        # () int32, next free slot


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------
def rms_norm(x, scale, eps: float, plus_one: bool):
  """HF's RMSNorm: normalise in float32, scale, cast back (Gemma scales by 1 + w in float32)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  if plus_one:
    return (x * (1.0 + scale.astype(jnp.float32))).astype(dtype)
  return scale.astype(dtype) * x.astype(dtype)


def rope_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [hd/2], with HF's `linear` and `llama3` scalings."""
  hd = cfg.dim_per_head
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if cfg.rope_type == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = ((cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotate-half RoPE (HF layout: the two halves of each head are the pair)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq            # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :].astype(x.dtype)
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def attention_mask(q_slots, q_seg, k_slots, k_seg, sliding_window: Optional[int], q_prefix=None,
                   q_pos=None, k_pos=None):
  """[B, 1, Tq, Tk] boolean: causal by slot, same non-padding segment, optional sliding window.

  `q_prefix` [B, Tq] (shared-prompt packing): a query also sees the keys of segment q_prefix (its prompt,
  earlier in the row; 0 = none). The window then counts RoPE positions (`q_pos`, `k_pos`), since sibling
  completions sit between a completion and its prompt."""
  causal = k_slots[:, None, :] <= q_slots[:, :, None]
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  if q_prefix is not None:
    same |= (q_prefix[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    q_slots, k_slots = q_pos, k_pos
  mask = causal & same
  if sliding_window is not None:
    mask &= q_slots[:, :, None] - k_slots[:, None, :] < sliding_window
  # A padding query would see no key at all; let it see itself so its softmax stays finite.
  mask |= (q_slots[:, :, None] == k_slots[:, None, :]) & (q_seg[:, :, None] == 0)
  return mask[:, None]


def _linear(x, p):
  y = peft.dot(x, p["kernel"])
  if "bias" in p:
    y = y + p["bias"].astype(y.dtype)
  return y


_ACT = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False)}

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decoder:
  config: DecoderConfig

  # ---- parameters -----------------------------------------------------------------------------------
  def init(self, rng: jax.Array) -> Params:
    c = self.config
    pd = jnp.dtype(c.param_dtype)
    D, L, F, hd = c.hidden_size, c.num_layers, c.intermediate_size, c.dim_per_head
    keys = iter(jax.random.split(rng, 16))

    def normal(shape):
      return (c.init_std * jax.random.normal(next(keys), shape, jnp.float32)).astype(pd)

    def dense(din, dout, bias):
      p = {"kernel": normal((L, din, dout))}
      if bias:
        p["bias"] = jnp.zeros((L, dout), pd)
      return p

    norm = (jnp.zeros if c.norm_plus_one else jnp.ones)
    params = {
        "embed": {"embedding": normal((c.vocab_size, D))},
        "layers": {
            "attn_norm": {"scale": norm((L, D), pd)},
            "attn": {
                "q_proj": dense(D, c.num_heads * hd, c.qkv_bias),
                "k_proj": dense(D, c.num_kv_heads * hd, c.qkv_bias),
                "v_proj": dense(D, c.num_kv_heads * hd, c.qkv_bias),
                "o_proj": dense(c.num_heads * hd, D, c.o_bias),
            },
            "mlp_norm": {"scale": norm((L, D), pd)},
            "mlp": {
                "gate_proj": dense(D, F, c.mlp_bias),
                "up_proj": dense(D, F, c.mlp_bias),
                "down_proj": dense(F, D, c.mlp_bias),
            },
        },
        "final_norm": {"scale": norm((D,), pd)},
    }
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": normal((D, c.vocab_size))}
    return params

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    c = self.config
    dtype = jnp.dtype(dtype or c.dtype)
    shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.dim_per_head)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32))

  # ---- forward --------------------------------------------------------------------------------------
  def input_embeddings(self, params):
    """The input embedding table [V, D] as stored (a loss's ground cost between tokens)."""
    return params["embed"]["embedding"]

  def embed(self, params, tokens):
    c = self.config
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(c.dtype)
    if c.embed_scale:
      x = x * jnp.asarray(c.hidden_size ** 0.5, c.dtype)
    return x

  def _layer(self, x, p, positions, mask, kv_in, cache_index, capture=False):
    """One decoder layer. kv_in: (k_cache, v_cache) [B, S, KV, hd] or None.

    With `capture`, also returns the per-input-channel sum of squares of each linear layer's input
    (q/k/v share `attn_in`, gate/up share `mlp_in`): the activation statistics of Wanda / OWL scores.
    """
    stats = {}
    sumsq = lambda t, mask_: jnp.einsum("bt,bti->i", mask_, jnp.square(t.astype(jnp.float32)))
    c = self.config
    B, T, _ = x.shape
    hd = c.dim_per_head
    h = rms_norm(x, p["attn_norm"]["scale"], c.norm_eps, c.norm_plus_one)
    if capture is not False:
      stats["attn_in"] = sumsq(h, capture)
    a = p["attn"]
    q = _linear(h, a["q_proj"]).reshape(B, T, c.num_heads, hd)
    k = _linear(h, a["k_proj"]).reshape(B, T, c.num_kv_heads, hd)
    v = _linear(h, a["v_proj"]).reshape(B, T, c.num_kv_heads, hd)
    inv_freq = jnp.asarray(rope_frequencies(c))
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    kv_out = None
    if kv_in is not None:
      kc = jax.lax.dynamic_update_slice_in_dim(kv_in[0], k.astype(kv_in[0].dtype), cache_index, axis=1)
      vc = jax.lax.dynamic_update_slice_in_dim(kv_in[1], v.astype(kv_in[1].dtype), cache_index, axis=1)
      kv_out = (kc, vc)
      k, v = kc.astype(q.dtype), vc.astype(q.dtype)
    if mask is None:   # plain causal rows: lets cuDNN use its flash kernel
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=c.attention_impl,
                                       local_window_size=(c.sliding_window - 1, 0) if c.sliding_window else None)
    else:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)
    o = o.reshape(B, T, c.num_heads * hd)
    x = x + _linear(o, a["o_proj"])
    h = rms_norm(x, p["mlp_norm"]["scale"], c.norm_eps, c.norm_plus_one)
    if capture is not False:
      stats["o_proj_in"] = sumsq(o, capture)
      stats["mlp_in"] = sumsq(h, capture)
    m = p["mlp"]
    h = _ACT[c.activation](_linear(h, m["gate_proj"])) * _linear(h, m["up_proj"])
    if capture is not False:
      stats["down_proj_in"] = sumsq(h, capture)
    x = x + _linear(h, m["down_proj"])
    return x, (kv_out, stats) if capture is not False else kv_out

  def apply(self, params: Params, tokens: jax.Array, positions: Optional[jax.Array] = None,
            segment_ids: Optional[jax.Array] = None, *, cache: Optional[Cache] = None,
            return_hidden: bool = False, capture_inputs: bool = False, head: bool = True,
            prefix_ids: Optional[jax.Array] = None):
    """Logits [B, T, V] in the compute dtype (float32 by default).

    Args:
      tokens: [B, T] int.
      positions: [B, T] RoPE positions; default 0..T-1 (continuing from the cache's index).
      segment_ids: [B, T] document ids for packed rows, 0 for padding; default all ones.
      cache: a `Cache` to decode with; then the new cache is returned too.
      return_hidden: also return the final normed hidden states [B, T, D].
      capture_inputs: also return {name: [L, in]} sums over real tokens (segment != 0) of the squared
        inputs of the linear layers (names attn_in, o_proj_in, mlp_in, down_proj_in), for calibration.
      head: False skips the output head: None stands in for the logits (the chunked losses read `hidden`
        and `output_head`).
      prefix_ids: [B, T] with `segment_ids`, no cache: the segment each token also attends to (a shared
        prompt, `data._pref_packing`), 0 for none; default None: segments only.
    Returns:
      logits, then hidden / cache / captured statistics, each only when asked for.
    """
    c = self.config
    B, T = tokens.shape
    start = cache.index if cache is not None else 0
    slots = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if positions is None:
      positions = slots
    plain_causal = segment_ids is None and cache is None
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    if prefix_ids is not None and (cache is not None or plain_causal):
      raise ValueError("prefix_ids needs segment_ids and no cache")
    if cache is not None:
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids.astype(jnp.int32), start, 1)
      k_slots = jnp.broadcast_to(jnp.arange(k_seg.shape[1], dtype=jnp.int32), k_seg.shape)
      mask = attention_mask(slots, segment_ids, k_slots, k_seg, c.sliding_window)
    elif plain_causal:
      mask = None
    else:
      mask = attention_mask(slots, segment_ids, slots, segment_ids, c.sliding_window, prefix_ids, positions,
                            positions)

    x = self.embed(params, tokens)

    capture = (segment_ids != 0).astype(jnp.float32) if capture_inputs else False

    # Adapter nodes whose children do not all carry the layer axis (layer sampling) split themselves
    # into what the scan slices and what the body closes over (`peft.scan_split`); a no-op otherwise.
    layers, closed = peft.scan_split(params["layers"])

    def body(x, layer):
      p, kv = layer
      # What adapters sow in this layer (auxiliary loss terms, `losses.sow`) leaves the scan as an output.
      with losses.collecting() as sown:
        x, out = self._layer(x, peft.scan_bind(p, closed), positions, mask, kv, start, capture)
      return x, (out, losses.stacked(sown))

    if c.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT[c.remat], prevent_cse=not c.scan_layers)
    kv_in = (cache.k, cache.v) if cache is not None else None
    if c.scan_layers:
      x, (kv_out, sown) = jax.lax.scan(body, x, (layers, kv_in))
    else:
      outs = []
      for i in range(c.num_layers):
        layer = jax.tree.map(lambda a: a[i], (layers, kv_in))
        x, out = body(x, layer)
        outs.append(out)
      kv_out, sown = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else (None, {})
    for name, value in sown.items():   # [L, M, ...] per name, to the caller's collection
      losses.sow(name, value)
    if capture_inputs:
      kv_out, stats = kv_out

    hidden = rms_norm(x, params["final_norm"]["scale"], c.norm_eps, c.norm_plus_one)
    logits = self.logits(params, hidden) if head else None
    out = (logits,)
    if return_hidden:
      out += (hidden,)
    if cache is not None:
      out += (Cache(kv_out[0], kv_out[1], k_seg, start + T),)
    if capture_inputs:
      out += (stats,)
    return out[0] if len(out) == 1 else out

  def logits(self, params, hidden):
    if self.config.tie_embeddings:
      return jnp.einsum("...d,vd->...v", hidden, params["embed"]["embedding"].astype(hidden.dtype))
    return peft.dot(hidden, params["lm_head"]["kernel"])

  def output_head(self, params):
    """(W, vocab_axis) with logits = hidden @ W ([D, V], axis 1) or hidden @ W^T ([V, D], axis 0, tied), the
    weight an adapter on lm_head stands for included (its merge, through which gradients reach the adapter);
    None when the head is no single matrix (an adapter whose input dropout is active this step)."""
    if self.config.tie_embeddings:
      return params["embed"]["embedding"], 0
    w = params["lm_head"]["kernel"]
    if peft.is_adapter(w):
      if getattr(w, "dropout", 0.0) and getattr(w, "rng", None) is not None:
        return None
      return w.materialize(), 1
    return w, 1

  # ---- bookkeeping ----------------------------------------------------------------------------------
  def num_params(self, params) -> int:
    return peft.count(params)

  def flops_per_token(self, seq_len: int, trainable_weights: bool = True) -> float:
    """Model FLOPs per token of one training step, counted as the PyTorch peer benchmark counts them."""
    c = self.config
    hd, D = c.dim_per_head, c.hidden_size
    per_layer = D * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * D + 3 * D * c.intermediate_size
    n = c.num_layers * per_layer + D * c.vocab_size           # lm_head counted, embedding gather not
    flops = (6 if trainable_weights else 4) * n
    return flops + 3 * 2 * seq_len * D * c.num_layers
