"""TSV-M: task singular vectors, decorrelated across tasks, then summed.

For a 2-D tensor with task vectors tau_i = U_i S_i V_i^T (T tasks, r = min(m, n), k = floor(r / T)):
    U = [U_1[:, :k] .. U_T[:, :k]],  S = diag(S_1[:k] .. S_T[:k]),  V = [V_1[:, :k] .. V_T[:, :k]]
    U_perp = P Q^T for U = P Sigma Q^T (the nearest orthonormal matrix, i.e. decorrelation); same for V
    theta = theta_base + lambda U_perp S V_perp^T
Tensors of other ranks (norms, biases) take the mean task vector: theta = theta_base + lambda mean_i tau_i.

(Gargiulo et al., 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging",
arXiv:2412.00081; ref `AntoAndGar/task_singular_vectors`, `compute_and_sum_svd_mem_reduction`.) SVDs run
in float32; the result does not depend on the layout ([in, out] or [out, in]). Not in mergekit.
"""
import jax.numpy as jnp

from merging._registry import register_merge


def _polar(x):
  p, _, qt = jnp.linalg.svd(x, full_matrices=False)
  return p @ qt


@register_merge("tsv_m", per_model=())
def tsv_m(base, models, *, lambda_: float = 1.0, key=None, row_axis=-1):
  """TSV-M (module docstring)."""
  del key, row_axis
  taus = [x - base for x in models]
  if base.ndim != 2:
    return base + lambda_ * (sum(taus) / len(taus))
  t = len(taus)
  k = int(min(base.shape) * (1.0 / t))   # the reference int(r * (1 / T)), not r // T
  if k == 0:
    return base
  us, ss, vs = [], [], []
  for tau in taus:
    u, s, vt = jnp.linalg.svd(tau, full_matrices=False)
    us.append(u[:, :k]); ss.append(s[:k]); vs.append(vt[:k])
  u, s, vt = jnp.concatenate(us, 1), jnp.concatenate(ss), jnp.concatenate(vs, 0)
  delta = _polar(u) @ (s[:, None] * _polar(vt))
  return base + lambda_ * delta
