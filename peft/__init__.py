"""Adapters as parameter transforms; projected optimizers and layer sampling as optax transforms.

Public surface:
  dot(x, w)                     the linear-layer dispatch every model matmul goes through
  split(params) / combine(t, f) trainable and frozen parts (None placeholders keep the structure)
  merge(params) / strip(params) fold adapters into plain weights / drop them (the reference model)
"""
from peft._core import (Adapter, combine, count, dot, flatten, has_adapters, is_adapter, map_with_path,
                        merge, path_str, split, strip)
from peft._tempbalance import (AddLayerwiseDecayState, ScaleByLayerwiseLrState, Schedule, TempBalanceConfig,
                               adamw_layerwise_wd, schedule,
                               add_layerwise_decayed_weights, refresh_multipliers, scale_by_layerwise_lr,
                               tempbalance)
from peft._fira import ScaleByFiraState, fira, scale_by_fira
from peft._frugal import ScaleByFrugalState, frugal, scale_by_frugal
from peft._galore import ScaleByGaLoreState, galore, scale_by_galore
from peft._apply import (AdapterSpec, adapter_names, apply, apply_config, check_config, default_config,
                         get_adapter, register_adapter, residual_to_lora, with_dropout_rng)
from peft._init import init_names, register_init
from peft._quant import QuantizedWeight, nbytes, quantize_array, quantize_params
from peft._lora import LoRA
from peft._dora import DoRA
from peft._ia3 import IA3
from peft._export import export_adapter, import_adapter
from peft._apply import adapter_node, register_hf_format, static_field, target_regex
from peft._quant import float_weight, like_base
from peft._core import scan_bind, scan_split
from peft._sampling import (HFTState, SampledLayers, hft, hft_selection, layer_probs, reset_slot_state,
                             resample, sample_layers, sampled_blocks)
from peft._lift import ScaleByLiftState, lift, principal_indices, scale_by_lift
from peft._lora_pro import ScaleByLoraProState, corrected_lora_grads, lora_pro, scale_by_lora_pro
