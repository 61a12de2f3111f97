"""Shared by the experiment scripts: loading a config file by name, and the base model they fine-tune."""
from __future__ import annotations

import argparse
import importlib.util
import os

import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def transfer_args(out_name: str, base_steps: int, steps: int) -> argparse.Namespace:
  """--workdir, --out, --model, --base_steps, --steps of the sort -> reverse transfer experiments."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", out_name))
  p.add_argument("--model", default="small")
  p.add_argument("--base_steps", type=int, default=base_steps)
  p.add_argument("--steps", type=int, default=steps)
  return p.parse_args()


def train_base(workdir: str, model: str, steps: int, task: str = "sort", seed: int = 0, smoke: bool = False) -> str:
  """The base model trained on `task` (reused when `workdir/base` already holds a finished run).

  `seed` sets its initialisation and data order; `smoke` uses the config's seconds-long settings.
  """
  base = os.path.join(workdir, "base")
  if not os.path.exists(os.path.join(base, "summary.json")):
    cfg = get_config("sft.py", f"model={model},task={task},steps={steps}" + (",smoke" if smoke else ""))
    cfg.seed = seed
    train_lib.train_and_evaluate(cfg, base)
  return base
