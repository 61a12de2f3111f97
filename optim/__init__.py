"""Optimizers as optax transformations, their registry, and the factory that builds a run's optimizer.

Public surface:
  make(config.optim, trainable, total_steps)   the whole chain: clipping, per-rule optimizers, schedule
  from_config(config, trainable)               make(), plus TempBalance's multipliers when enabled
  default_config()                             `config.optim`: common settings + one section per optimizer
  register_optimizer(name)                     add an optimizer; its keyword defaults are its config section
  galore / fira / frugal / lift / lora_pro     projected and sparse optimizers (`scale_by_<m>` + `<m>`)
  hft                                          Half Fine-Tuning around any optimizer
  loraplus / lorafa                            LoRA+ (B's lr x ratio) and LoRA-FA (A frozen, B projected)
  register_adapter_transform(method)           what an adapter needs from the optimizer (AdaLoRA's allocator)
  tempbalance / refresh_multipliers / schedule TempBalance / Model Balancing layerwise rates from HT-SR alpha
  layer_probs / draw / reset_slot_state        layer sampling (LISA, OwLore) over `peft`'s slot nodes

Host work between steps (resampling, ESD refreshes, HFT stages) is registered with `hooks.register_hook`
by the modules below; importing the package registers them.
"""
from optim._registry import (OptimizerFactory, PROJECTED, adapter_transform, default_config as optimizer_config,
                             get_optimizer, optimizer_names, options, path_mask, register_adapter_transform,
                             register_optimizer)
from optim._factory import NO_DECAY, SCHEDULES, check_config, default_config, first_match_labels, from_config, make, make_schedule, resolve
from optim._galore import ScaleByGaLoreState, galore, scale_by_galore
from optim._fira import ScaleByFiraState, fira, scale_by_fira
from optim._frugal import ScaleByFrugalState, frugal, scale_by_frugal
from optim._lift import ScaleByLiftState, lift, principal_indices, scale_by_lift
from optim._spiel import SpielState, prune_regrow as spiel_prune_regrow, spiel
from optim._lora_pro import ScaleByLoraProState, corrected_lora_grads, lora_pro, scale_by_lora_pro
from optim._tempbalance import (AddLayerwiseDecayState, LayerwiseDecayState, RunConfig as TempBalanceRun,
                                ScaleByLayerwiseLrState, Schedule, TempBalanceConfig, add_layerwise_decayed_weights,
                                adamw_layerwise_wd, layerwise_decay, refresh_multipliers, scale_by_layerwise_lr,
                                schedule, tempbalance, tempbalance_config)
from optim._tempbalance import default_config as tempbalance_default_config
from optim._sampling import (METHODS as SAMPLING_METHODS, SamplingConfig, draw, inverse_alpha_scores,
                             layer_probs, outlier_scores, reset_slot_state, sampling_hook)
from optim._hft import HFTState, hft, hft_selection
from optim._loraplus import loraplus, loraplus_labels
from optim._lorafa import ScaleByHfAdamState, lorafa, lorafa_gradients, scale_by_hf_adam, scale_by_lorafa
from optim._adalora import (AdaLoraState, budget_of as adalora_budget, budget_table as adalora_budget_table,
                            rank_allocator as adalora_rank_allocator)
from optim._sora import SoraProximalState, reference_threshold, soft_threshold, sora_proximal
from optim._increlora import IncreLoraState, grow as increlora_grow, score_emas as increlora_score_emas
