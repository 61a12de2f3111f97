"""Adapters as parameter transforms; projected optimizers and layer sampling as optax transforms.

Public surface:
  dot(x, w)                     the linear-layer dispatch every model matmul goes through
  split(params) / combine(t, f) trainable and frozen parts (None placeholders keep the structure)
  merge(params) / strip(params) fold adapters into plain weights / drop them (the reference model)
"""
from peft._core import (Adapter, combine, count, dot, flatten, has_adapters, is_adapter, map_with_path,
                        merge, path_str, split, strip)
from peft._tempbalance import (AddLayerwiseDecayState, ScaleByLayerwiseLrState, TempBalanceConfig,
                               add_layerwise_decayed_weights, refresh_multipliers, scale_by_layerwise_lr,
                               tempbalance)
from peft._fira import ScaleByFiraState, fira, scale_by_fira
from peft._frugal import ScaleByFrugalState, frugal, scale_by_frugal
from peft._galore import ScaleByGaLoreState, galore, scale_by_galore
