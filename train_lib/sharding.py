"""Mesh and sharding rules: one code path from 1 CPU to 8 simulated devices to a TPU pod.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters get a PartitionSpec from ordered regex rules over their
'/' paths (first full match wins); an axis whose size does not divide the dimension is dropped, so the same
rules serve tiny test models. Batches are sharded over ('data', 'fsdp') on their leading axis.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import peft

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Kernels are [L, in, out] (stacked) or [in, out]; adapter children (…/kernel/a etc.) fall to the default.
DEFAULT_RULES = (
    (r"embed/embedding", ("tensor", "fsdp")),
    (r"layers/attn/(q|k|v)_proj/kernel(/base|/slots)?", (None, "fsdp", "tensor")),
    (r"layers/mlp/(gate|up)_proj/kernel(/base|/slots)?", (None, "fsdp", "tensor")),
    (r"layers/attn/o_proj/kernel(/base|/slots)?", (None, "tensor", "fsdp")),
    (r"layers/mlp/down_proj/kernel(/base|/slots)?", (None, "tensor", "fsdp")),
    (r"layers/.*/bias", (None, "tensor")),
    (r"lm_head/kernel(/base|/slots)?", ("fsdp", "tensor")),
    (r".*", ()),
)


def make_mesh(cfg=None, devices=None) -> Mesh:
  """cfg: {data, fsdp, tensor} sizes; one of them may be -1 (all remaining devices)."""
  devices = devices if devices is not None else jax.devices()
  sizes = [int((cfg or {}).get(a, -1 if a == "data" else 1)) for a in AXES]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if n % known:
      raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} does not divide {n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def spec_for(path: str, shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  for rx, axes in rules:
    if re.fullmatch(rx, path):
      break
  else:
    axes = ()
  axes = tuple(axes)[: len(shape)]
  axes = axes + (None,) * (len(shape) - len(axes))
  # Rules are written for stacked kernels; an unstacked 2-D leaf uses the last two entries.
  if len(axes) > len(shape):
    axes = axes[-len(shape):]
  fixed = []
  for dim, ax in zip(shape, axes):
    fixed.append(ax if ax is not None and dim % mesh.shape[ax] == 0 and mesh.shape[ax] > 1 else None)
  return P(*fixed)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a (possibly abstract) tree; None leaves stay None."""
  def one(path, x):
    if x is None:
      return None
    shape = getattr(x, "shape", ())
    if re.fullmatch(r"(params|opt_state)/.*", path) is None and len(shape) == 0:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec_for(_param_path(path), shape, mesh, rules))
  return peft.map_with_path(one, tree, is_leaf=lambda z: z is None)


def _param_path(path: str) -> str:
  """Optimizer-state leaves mirror param paths inside their own containers: find the param part."""
  for anchor in ("embed/", "layers/", "final_norm/", "lm_head/"):
    i = path.find(anchor)
    if i >= 0:
      return path[i:]
  return path


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
