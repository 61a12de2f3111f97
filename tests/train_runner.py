"""Runs a training config in a fresh process (device count, kill-and-resume tests).

    python tests/train_runner.py CONFIG_FILE:ARG WORKDIR OUT.npz '{"total_steps": 8, "mesh.fsdp": 2}'

Writes the final trainable params (flattened by path) and the last logged loss to OUT.npz.
"""
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def apply_overrides(config, overrides: dict):
  for key, val in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = val
  return config


def main():
  spec, workdir, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
  import jax
  import peft
  import train_lib
  config = apply_overrides(load_config(spec), overrides)
  summary = train_lib.train_and_evaluate(config, workdir)
  flat = peft.flatten(jax.device_get(summary["state"].params))
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  np.savez(out, **{"param/" + k: np.asarray(v) for k, v in flat.items()},
           losses=np.asarray([r["loss"] for r in records if "loss" in r]),
           resumed_from=np.asarray(summary.get("resumed_from", -1)),
           devices=np.asarray(jax.device_count()))


if __name__ == "__main__":
  main()
