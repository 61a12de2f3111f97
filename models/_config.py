"""Decoder configuration: one frozen dataclass covers the Llama, Mistral, Qwen2 and Gemma shapes.

Named presets are classmethods; variants come from `dataclasses.replace`. The config is hashable, so a
`Decoder` built from it is a static argument of jitted functions.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: Optional[int] = None          # None: hidden_size // num_heads
  activation: str = "silu"                # gate activation of the gated MLP: silu (SwiGLU), gelu_tanh (GeGLU)
  norm_eps: float = 1e-5
  norm_plus_one: bool = False             # Gemma's RMSNorm scales by (1 + w)
  embed_scale: bool = False               # Gemma multiplies embeddings by sqrt(hidden_size)
  tie_embeddings: bool = False            # lm_head = embedding^T
  qkv_bias: bool = False                  # Qwen2
  o_bias: bool = False                    # Llama's attention_bias=True also biases o_proj
  mlp_bias: bool = False
  rope_theta: float = 10_000.0
  rope_type: str = "default"              # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0       # llama3 scaling
  rope_high_freq_factor: float = 4.0      # llama3 scaling
  rope_original_max_positions: int = 8192 # llama3 scaling
  max_position_embeddings: int = 4096
  sliding_window: Optional[int] = None    # Mistral v0.1: keys at most this many slots back
  init_std: float = 0.02
  param_dtype: str = "float32"            # storage dtype of the weights
  dtype: str = "float32"                  # compute dtype of activations and matmuls
  remat: str = "none"                     # none | full | dots | dots_no_batch (per decoder layer)
  scan_layers: bool = True                # scan over the stacked layers (compile time independent of depth)
  attention_impl: Optional[str] = None    # None/"xla" or "cudnn" (GPU flash attention)
  # The losses' log-probs, logsumexp and log sum p^2 come from [chunk, chunk] tiles of (tokens, vocabulary)
  # with a recomputing custom gradient (losses/_chunked.py), never from [B, T, V] float32 logits; 0: the
  # full logits. Equal to within float32 rounding; memory flat in the vocabulary.
  logits_chunk: int = 4096

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; valid: {ACTIVATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; valid: {REMAT_POLICIES}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}; valid: {ROPE_TYPES}")
    if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
      raise ValueError(f"logits_chunk={self.logits_chunk!r} must be an int >= 0 (0: full logits)")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}; valid: None, 'xla', 'cudnn'")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)

  # ---- presets --------------------------------------------------------------------------------------
  @classmethod
  def tiny(cls, vocab_size: int = 256, **kw):
    """A few hundred thousand parameters: tests and the CPU demo."""
    return cls(**{**dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=176), **kw})

  @classmethod
  def small(cls, vocab_size: int = 256, **kw):
    """About 3M parameters: the CPU demo's model."""
    return cls(**{**dict(vocab_size=vocab_size, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                         intermediate_size=512), **kw})

  @classmethod
  def bench_tiny(cls, **kw):
    """`SIZE=tiny` of the PyTorch peer benchmark."""
    return cls(**{**dict(vocab_size=32_000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                         intermediate_size=688), **kw})

  @classmethod
  def llama_1b(cls, **kw):
    """TinyLlama-1.1B (`SIZE=1b` of the peer benchmark)."""
    return cls(**{**dict(vocab_size=32_000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                         intermediate_size=5632), **kw})

  @classmethod
  def llama2_7b(cls, **kw):
    return cls(**{**dict(vocab_size=32_000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                         intermediate_size=11008), **kw})

  @classmethod
  def llama3_8b(cls, **kw):
    return cls(**{**dict(vocab_size=128_256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         intermediate_size=14336, rope_theta=500_000.0, rope_type="llama3", rope_factor=8.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8192,
                         max_position_embeddings=131_072), **kw})

  @classmethod
  def mistral_7b(cls, **kw):
    return cls(**{**dict(vocab_size=32_000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         intermediate_size=14336, rope_theta=10_000.0, max_position_embeddings=32_768), **kw})

  @classmethod
  def qwen2_0_5b(cls, **kw):
    return cls(**{**dict(vocab_size=151_936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         intermediate_size=4864, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6,
                         rope_theta=1_000_000.0, max_position_embeddings=32_768), **kw})

  @classmethod
  def gemma_2b(cls, **kw):
    return cls(**{**dict(vocab_size=256_000, hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                         head_dim=256, intermediate_size=16384, activation="gelu_tanh", norm_eps=1e-6,
                         norm_plus_one=True, embed_scale=True, tie_embeddings=True), **kw})


PRESETS = ("tiny", "small", "bench_tiny", "llama_1b", "llama2_7b", "llama3_8b", "mistral_7b", "qwen2_0_5b",
           "gemma_2b")


def preset(name: str, **kw) -> DecoderConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
  return getattr(DecoderConfig, name)(**kw)
