"""Adapters as parameter transforms; projected optimizers and layer sampling as optax transforms.

Public surface:
  dot(x, w)                     the linear-layer dispatch every model matmul goes through
  split(params) / combine(t, f) trainable and frozen parts (None placeholders keep the structure)
  merge(params) / strip(params) fold adapters into plain weights / drop them (the reference model)
"""
from peft._core import (Adapter, combine, count, dot, flatten, has_adapters, is_adapter, map_with_path,
                        merge, path_str, split, strip)
