"""HT-SR spectral diagnostics: ESDs of weight matrices and their power-law exponent alpha.

Public surface:
  analyze(params, config) -> [EsdRecord]   one fit per matrix and per slice of a stacked kernel
  block_alphas(records)                    mean alpha of each decoder block
  EsdConfig                                the estimator (xmin rule, filters, precision), saved with each record
  esd(w) / fit_powerlaw(lam) / spectral_metrics(lam, alpha)   the pieces, for arrays
  record_rows / write_csv / format_table / plot_alpha_per_layer / plot_esd   reports (_report)
  entanglement(model, trainable, frozen, batch)  gradient entanglement of chosen/rejected (_entanglement),
                                           logged by a host hook with `config.entanglement_every_steps`

The `diagnose` task of main.py (tables and plots of a checkpoint) is `train_lib.diagnose`.
"""
from diagnostics._esd import (ESD_PRESETS, EsdConfig, EsdRecord, analyze, block_alphas, block_of, esd, fit_matrices,
                              fit_spectrum, is_stacked, record_spectrum, summary)
from diagnostics._powerlaw import MODES, PowerLawFit, fit_powerlaw, hill_alphas, ks_rows, spectral_metrics
from diagnostics._report import (COLUMNS, format_table, matrix_name, plot_alpha_per_layer, plot_esd, read_csv,
                                 record_rows, write_csv, write_json)
from diagnostics._outliers import (DEFAULT_M, channel_norms, outlier_distribution, outlier_ratios,
                                   wanda_scores)
from diagnostics._entanglement import entanglement, indicators, pair_stats, tree_dot
