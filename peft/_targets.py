"""Adapter targets: HF PEFT module names, `all-linear` or a '/'-path regex -> the kernels they select."""
from __future__ import annotations

import re
from typing import Any, Mapping

from peft._core import is_adapter, map_with_path
from peft._node import AdapterSpec

Params = Any


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------
# HF module names -> our kernel paths (see models/_decoder.py).
HF_MODULES = {
    "q_proj": "layers/attn/q_proj/kernel", "k_proj": "layers/attn/k_proj/kernel",
    "v_proj": "layers/attn/v_proj/kernel", "o_proj": "layers/attn/o_proj/kernel",
    "gate_proj": "layers/mlp/gate_proj/kernel", "up_proj": "layers/mlp/up_proj/kernel",
    "down_proj": "layers/mlp/down_proj/kernel", "lm_head": "lm_head/kernel",
}
_HF_PARENTS = {"self_attn": "attn", "mlp": "mlp"}
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def target_regex(target: str) -> str:
  """One target (HF module name, 'all-linear' or a regex) -> a regex over kernel paths."""
  if target == "all-linear":
    return r"(?!lm_head/).*/kernel"
  if _NAME.fullmatch(target):
    parts = target.split(".")
    parts = [_HF_PARENTS.get(p, p) for p in parts[:-1]] + parts[-1:]
    return r"(.*/)?" + re.escape("/".join(parts)) + r"/kernel"
  return target


def kernel_paths(params: Params) -> list[str]:
  """Paths of the leaves adapters can wrap: arrays of rank >= 2 ending in '/kernel', and existing nodes."""
  out = []
  def visit(path, leaf):
    if is_adapter(leaf) or (getattr(leaf, "ndim", 0) >= 2 and path.endswith("/kernel")):
      out.append(path)
    return leaf
  map_with_path(visit, params, is_leaf=is_adapter)
  return out


def as_targets(key) -> tuple[str, ...]:
  if isinstance(key, str):
    return tuple(t.strip() for t in key.split(",") if t.strip()) if _is_name_list(key) else (key,)
  return tuple(key)


def _is_name_list(s: str) -> bool:
  """'q_proj,v_proj' (a config string) rather than one regex."""
  return all(_NAME.fullmatch(t.strip()) or t.strip() == "all-linear" for t in s.split(",") if t.strip())


def match_targets(params: Params, spec: Mapping) -> dict[str, AdapterSpec]:
  """{kernel path: spec} for the paths the spec's targets select (first target wins). Raises on a target
  that matches no kernel, listing the kernels and module names that exist."""
  paths = kernel_paths(params)
  rules = []
  for key, s in spec.items():
    for t in as_targets(key):
      rules.append((t, re.compile(target_regex(t)), s))
  chosen, hits = {}, {t: 0 for t, _, _ in rules}
  for p in paths:
    for t, rx, s in rules:
      if rx.fullmatch(p):
        hits[t] += 1
        chosen.setdefault(p, s)
  missing = [t for t, n in hits.items() if n == 0]
  if missing:
    raise ValueError(f"adapter target(s) {missing} match no kernel; kernels: {paths}; module names: "
                     f"{', '.join(HF_MODULES)}, all-linear")
  return chosen
