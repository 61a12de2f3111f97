"""Linear merge (model soup): theta = sum_i w_i theta_i / sum_i w_i  (normalize=True; else the plain sum).

(Wortsman et al., 2022, "Model soups", arXiv:2203.05482.) The base is not used. SALSA's reference model
is the soup of two SFT runs: `linear(None, [sft1, sft2])`. mergekit 0.1.5 `linear`.
"""
import jax.numpy as jnp

from merging._registry import register_merge


@register_merge("linear", base="unused", per_model=("weight",))
def linear(base, models, *, weight=1.0, normalize: bool = True, key=None, row_axis=-1):
  """Weighted average of the models (module docstring)."""
  del base, key, row_axis
  out = jnp.zeros_like(models[0])
  for w, x in zip(weight, models):
    out = out + w * x
  return out / sum(weight) if normalize else out
