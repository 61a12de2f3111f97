"""Model merging: pure functions over parameter trees, a registry by name, and streaming checkpoint merges.

    merged = merging.ties(base, [ft1, ft2], density=0.2, weight=[1.0, 0.5])     # nested dicts of arrays
    merged = merging.get("dare_ties")(base, [ft1, ft2], density={"embed/.*": 1.0, ".*": 0.3}, seed=0)
    merging.merge_checkpoints("ties", "base_hf/", ["ft1_hf/", "ft2_hf/"], "out_hf/", density=0.2)
    lora = merging.lora_cat([lora1, lora2], weight=[0.7, 0.3])                  # {path: (a, b)}

See merging/README.md for every method, its parameters and defaults, and the differences from mergekit.
"""
from merging._registry import (STACKED, MergeMethod, flatten, get, merge_trees, names, register_merge, resolve,
                               tensor_key, unflatten)
from merging._sparsify import (della_mask, della_probs, kth_smallest, magnitude_mask, magnitude_outliers_mask,
                               random_mask, rescale_masked, sparsify, topk_mask)
from merging._consensus import agreement, disjoint_mean, elect_sign
from merging._task_arithmetic import generalized_task_arithmetic, task_arithmetic
from merging._linear import linear
from merging._ties import ties
from merging._dare import dare_linear, dare_ties
from merging._della import della, della_linear
from merging._breadcrumbs import breadcrumbs, breadcrumbs_ties
from merging._sce import sce
from merging._slerp import nuslerp, slerp
from merging._model_stock import model_stock
from merging._karcher import karcher
from merging._nearswap import nearswap
from merging._fisher import fisher, fisher_diagonal
from merging._pcb import pcb, pcb_merge_flat
from merging._tsv import tsv_m
from merging._compeft import compeft
from merging._compeft import compress as compeft_compress
from merging._lora_combine import (combine_loras, lora_cat, lora_dare_linear, lora_dare_ties, lora_delta,
                                   lora_factors, lora_linear, lora_magnitude_prune, lora_svd, lora_ties,
                                   truncated_svd)
from merging._lora_lego import kmeans, lora_lego
from merging._streaming import merge_checkpoints
