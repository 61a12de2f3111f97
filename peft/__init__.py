"""Adapters as parameter transforms: the linear-layer dispatch, adapter nodes, quantised bases, HF PEFT interop.

Public surface:
  dot(x, w)                     the linear-layer dispatch every model matmul goes through
  apply(params, spec, rng) / apply_config(params, config.peft, rng)   wrap the targeted kernels in adapters
  split(params) / combine(t, f) trainable and frozen parts (None placeholders keep the structure)
  merge(params) / strip(params) fold adapters into plain weights / drop them (the reference model)
  register_adapter(name)        add an adapter (see peft/ADDING_AN_ADAPTER.md)
  register_data_init(name)      add an init computed from calibration batches (EVA, LoRA-GA; peft/_data_init.py)
  regularizer(params)           the adapters' loss terms (AdaLoRA's orthogonality, SoRA's gate L1); None if none
  export_adapter / import_adapter   HF PEFT adapter directories
  sample_layers / resample      the slot nodes of layer sampling (LISA, OwLore); the sampling is `optim`'s
"""
from peft._core import (Adapter, combine, count, dot, flatten, has_adapters, is_adapter, map_with_path,
                        merge, path_str, regularizer, scan_bind, scan_split, split, strip)
from peft._node import (AdapterSpec, adapter_names, adapter_node, get_adapter, input_dropout, register_adapter,
                        register_hf_format, static_field)
from peft._targets import HF_MODULES, kernel_paths, match_targets, target_regex
from peft._apply import apply, apply_config, check_config, default_config, residual_to_lora, with_dropout_rng
from peft._init import init_names, register_init
from peft._data_init import (Calibration, data_init_defaults, data_init_names, get_data_init, is_data_init,
                             register_data_init)
from peft._quant import QuantizedWeight, float_weight, like_base, nbytes, quantize_array, quantize_params
from peft._lora import LoRA
from peft._dora import DoRA
from peft._ia3 import IA3
from peft._vera import VeRA, vera_basis
from peft._randlora import RandLoRA, randlora_basis
from peft._hra import HRA
from peft._miss import MiSS
from peft._nola import NOLA, nola_bases
from peft._loramoe import LoRAMoE
from peft._flora import FLoRA
from peft._compacter import Compacter
from peft._mos import MoS
from peft._adalora import AdaLoRA, adalora_options
from peft._dylora import DyLoRA, dylora_at_rank
from peft._sora import SoRA, sora_options, sora_prune
from peft._increlora import RESERVE_E as increlora_reserve_e, IncreLoRA, increlora_options
from peft._export import export_adapter, import_adapter, needs_initial
from peft._eva import eva_init
from peft._loraga import lora_ga_init
from peft._corda import corda_init
from peft._loftq import loftq_init
from peft._lorasb import LoRASB, lorasb_init
from peft._kasa import KaSA, kasa_options
from peft._slots import SampledLayers, is_sampled, place_like, resample, sample_layers, sampled_blocks
