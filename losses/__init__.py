"""SFT and preference losses: pure functions with one signature, picked by name.

    entry = losses.get(config.loss.name)   # .fn, .needs, .kind
    loss, metrics = entry.fn(policy, reference, batch, config.loss)
"""
from losses._registry import NEEDS, LossEntry, Outputs, get, names, register
from losses import _sft  # noqa: F401  (registers nll)
from losses._sft import masked_mean, nll_loss
