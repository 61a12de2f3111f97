"""HT-SR spectral diagnostics: ESDs of weight matrices and their power-law exponent alpha.

Public surface:
  analyze(params, config) -> [EsdRecord]   one fit per matrix and per slice of a stacked kernel
  block_alphas(records)                    mean alpha of each decoder block
  EsdConfig                                the estimator (xmin rule, filters, precision), saved with each record
  esd(w) / fit_powerlaw(lam) / spectral_metrics(lam, alpha)   the pieces, for arrays
"""
from diagnostics._esd import (EsdConfig, EsdRecord, analyze, block_alphas, block_of, esd, fit_matrices,
                              fit_spectrum, is_stacked, summary)
from diagnostics._powerlaw import MODES, PowerLawFit, fit_powerlaw, hill_alphas, ks_rows, spectral_metrics
