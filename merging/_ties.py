"""TIES-Merging: trim, elect sign, disjoint merge.

    tau_i' = top-density(|tau_i|) entries of tau_i      (trim; rescale optional, off by default)
    gamma  = sign(sum_i w_i tau_i')                      ("sum"; "count" elects by the signs only)
    tau    = sum_i w_i tau_i' [sign = gamma] / sum_i w_i [sign = gamma]     (normalize=True)
    theta  = theta_base + lambda tau

(Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708; the
paper keeps the top 20%, density=0.2.) Defaults are mergekit 0.1.5's `ties` (density 1.0, normalize on,
rescale off, lambda 1).
"""
from merging._registry import register_merge
from merging._task_arithmetic import generalized_task_arithmetic


@register_merge("ties", per_model=("weight", "density"))
def ties(base, models, *, weight=1.0, density=1.0, lambda_: float = 1.0, normalize: bool = True,
         consensus: str = "sum", rescale=None, key=None, row_axis=-1):
  """TIES-Merging (module docstring). Per model: weight, density (fraction kept)."""
  return generalized_task_arithmetic(base, models, weight=weight, density=density, key=key, row_axis=row_axis,
                                     sparsifier="magnitude", consensus=consensus, normalize=normalize,
                                     rescale=rescale, lambda_=lambda_)
