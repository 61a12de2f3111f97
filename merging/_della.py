"""DELLA: magnitude-ranked sampling (MagPrune), then a TIES or linear combination.

    per row r of tau_i (a PyTorch row: one output unit; a 1-D tensor is one row), rank the |entries|
    (0 = smallest) and keep entry j with p_j = density - eps + 2 eps rank_j / (m - 1);
    tau_i' = m tau_i / p   (rescale="density", the paper's 1/p_j)
    della:         theta = theta_base + lambda disjoint_mean(w tau', sign election)   (normalize on)
    della_linear:  theta = theta_base + lambda sum_i w_i tau_i'

(Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv:2406.11617.) Needs 0 < density - eps and density + eps < 1; eps defaults to 0.15.
Difference from mergekit 0.1.5: its `rescale: true` is L1-norm matching (`rescale="norm"` here).
Rows follow the PyTorch layout: for our `.../kernel [in, out]` leaves the ranking runs along `in`.
"""
from merging._registry import register_merge
from merging._task_arithmetic import generalized_task_arithmetic


@register_merge("della", per_model=("weight", "density", "epsilon"))
def della(base, models, *, weight=1.0, density=1.0, epsilon=0.15, lambda_: float = 1.0,
          normalize: bool = True, consensus: str = "sum", rescale="density", key=None, row_axis=-1):
  """DELLA with TIES sign election (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, epsilon=epsilon, key=key,
                                     row_axis=row_axis, sparsifier="della", consensus=consensus,
                                     normalize=normalize, rescale=rescale, lambda_=lambda_)


@register_merge("della_linear", per_model=("weight", "density", "epsilon"))
def della_linear(base, models, *, weight=1.0, density=1.0, epsilon=0.15, lambda_: float = 1.0,
                 normalize: bool = False, rescale="density", key=None, row_axis=-1):
  """DELLA with a weighted sum (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, epsilon=epsilon, key=key,
                                     row_axis=row_axis, sparsifier="della", consensus=None,
                                     normalize=normalize, rescale=rescale, lambda_=lambda_)
