"""Model Stock: interpolate the average of the fine-tunes towards the base by their agreement.

    cos = mean over pairs i < j of <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), clamped to [-1, 1]
    t = N cos / (1 + (N - 1) cos)     (t = 0, i.e. the base, where |1 + (N-1) cos| < 1e-6)
    theta = t mean_i(theta_i) + (1 - t) theta_base

(Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv:2403.19522.) Needs
N >= 2. `filter_wise=True` takes cos per row (a PyTorch row: one output). Averaging the pairwise cosines
for N > 2 is mergekit's choice (0.1.5 `model_stock`), kept here.
"""
import jax.numpy as jnp

from merging._registry import register_merge


@register_merge("model_stock", per_model=())
def model_stock(base, models, *, filter_wise: bool = False, key=None, row_axis=-1):
  """Model Stock (module docstring)."""
  del key
  if len(models) < 2:
    raise ValueError("model_stock needs at least two fine-tuned models and the base")
  shape = base.shape
  if filter_wise:
    axis = row_axis if base.ndim >= 2 else -1
    w0 = base if base.ndim >= 1 else base.reshape(1)
    ws = [x.reshape(w0.shape) for x in models]
  else:
    axis = -1
    w0, ws = base.reshape(-1), [x.reshape(-1) for x in models]
  offs = [x - w0 for x in ws]
  cos = []
  for i, a in enumerate(offs):
    for b in offs[i + 1:]:
      den = jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis)
      cos.append(jnp.clip(jnp.sum(a * b, axis=axis) / jnp.maximum(den, 1e-6), -1.0, 1.0))
  c = jnp.expand_dims(jnp.mean(jnp.stack(cos), axis=0), axis)
  n = len(ws)
  den = 1 + (n - 1) * c
  singular = jnp.abs(den) < 1e-6
  t = jnp.where(singular, 0.0, n * c / jnp.where(singular, 1.0, den))
  avg = sum(ws) / n
  return (t * avg + (1 - t) * w0).reshape(shape)
