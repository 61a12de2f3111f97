"""DARE: drop and rescale, then a linear or TIES combination.

    m_i ~ Bernoulli(density_i),   tau_i' = m_i tau_i / density_i      (rescale="density", the paper)
    dare_linear:  theta = theta_base + lambda sum_i w_i tau_i'        (/ sum w with normalize)
    dare_ties:    theta = theta_base + lambda disjoint_mean(w tau', sign election)

(Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", arXiv:2311.03099.) Difference from mergekit 0.1.5: its `rescale: true` matches the L1 norm of the
masked tensor to the original's instead of dividing by density; `rescale="norm"` restores that. Masks come
from `fold_in(tensor_key(seed, path), i)`, so they are reproducible but not torch's.
"""
from merging._registry import register_merge
from merging._task_arithmetic import generalized_task_arithmetic


@register_merge("dare_linear", per_model=("weight", "density"))
def dare_linear(base, models, *, weight=1.0, density=1.0, lambda_: float = 1.0, normalize: bool = False,
                rescale="density", key=None, row_axis=-1):
  """DARE with a weighted sum (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, key=key, row_axis=row_axis,
                                     sparsifier="random", consensus=None, normalize=normalize,
                                     rescale=rescale, lambda_=lambda_)


@register_merge("dare_ties", per_model=("weight", "density"))
def dare_ties(base, models, *, weight=1.0, density=1.0, lambda_: float = 1.0, normalize: bool = False,
              consensus: str = "sum", rescale="density", key=None, row_axis=-1):
  """DARE with TIES sign election and disjoint merge (module docstring)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, key=key, row_axis=row_axis,
                                     sparsifier="random", consensus=consensus, normalize=normalize,
                                     rescale=rescale, lambda_=lambda_)
