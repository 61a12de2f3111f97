"""SFT and preference losses: pure functions with one signature, picked by name.

    entry = losses.get(config.loss.name)   # .fn, .needs_for(cfg), .kind, .init_params(...)
    policy = losses.model_outputs(model, params, batch, entry.needs_for(config.loss))
    loss, metrics = entry.fn(policy, reference, batch, config.loss)
    loss, metrics = losses.add_aux_losses(loss, metrics, sown, batch, config.loss)   # terms the model sowed
"""
from losses._aux import (AuxTerm, add_aux_losses, aux_default_weights, collecting, register_aux, sow,
                          stacked)
from losses._registry import NEEDS, FrozenModel, LossEntry, LossParams, Outputs, get, names, register
from losses._outputs import model_outputs
from losses import _sft  # noqa: F401  (registers nll)
from losses._sft import masked_mean, nll_loss
from losses._sft_variants import (aligned_sft_loss, anchored_sft_loss, conf_limited_loss, dft_loss, poft_loss,
                                  token_kl)
from losses._dpo import LOSS_TYPES as DPO_LOSS_TYPES, dpo_loss, f_divergence_scores
from losses._pairwise_ref_free import cpo_loss, orpo_loss, simpo_loss
from losses._unpaired import bco_loss, bco_reward_shift, kto_loss
from losses._listwise import listmle_loss, listnet_loss, lipo_loss, pro_loss
from losses._kernels import (KERNELS, hmk_weights, init_hmk_params, log_hmk,
                             mahalanobis_precision_from_embeddings)
from losses._divergences import DIVERGENCES, divergence
from losses._dpo_kernels import dpo_kernels_loss, format_selection_table, select_kernel_divergence
from losses._selection import SelectionEntry, get_selection, register_selection
from losses._kernel_selection import (kernel_separability, positive_negative_divergence, select_pair,
                                      selection_statistics)
