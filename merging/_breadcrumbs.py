"""Model Breadcrumbs: drop the largest outliers and the smallest entries of each task vector.

    tau_i' = tau_i on ascending |tau_i| ranks [n_bot, n_bot + floor(density n)),
             n_bot = max(0, n - floor(density n) - floor(gamma n))    (gamma = 0.01 of the top dropped)
    breadcrumbs:       theta = theta_base + lambda sum_i w_i tau_i'
    breadcrumbs_ties:  theta = theta_base + lambda disjoint_mean(w tau', sign election)

(Davari & Belilovsky, 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
arXiv:2312.06795.) If gamma >= 1 - density only the top (1 - density) are dropped. Defaults are mergekit
0.1.5's (normalize off for both, rescale off).
"""
from merging._registry import register_merge
from merging._task_arithmetic import generalized_task_arithmetic


@register_merge("breadcrumbs", per_model=("weight", "density", "gamma"))
def breadcrumbs(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_: float = 1.0,
                normalize: bool = False, rescale=None, key=None, row_axis=-1):
  """Model Breadcrumbs with a weighted sum (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, gamma=gamma, key=key,
                                     row_axis=row_axis, sparsifier="magnitude_outliers", consensus=None,
                                     normalize=normalize, rescale=rescale, lambda_=lambda_)


@register_merge("breadcrumbs_ties", per_model=("weight", "density", "gamma"))
def breadcrumbs_ties(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_: float = 1.0,
                     normalize: bool = False, consensus: str = "sum", rescale=None, key=None, row_axis=-1):
  """Model Breadcrumbs with TIES sign election (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, gamma=gamma, key=key,
                                     row_axis=row_axis, sparsifier="magnitude_outliers", consensus=consensus,
                                     normalize=normalize, rescale=rescale, lambda_=lambda_)
