"""Train state, jitted steps, mesh and sharding rules, orbax checkpoints, metrics, eval and generation.

`TASKS` maps `config.task` to a function `(config, workdir)`; main.py only dispatches through it.
"""
import diagnostics
from train_lib.generation import generate
from train_lib import tasks as _tasks
from train_lib.select_kernels import select_kernels as _select_kernels
from train_lib.train import TrainState, model_outputs, train_and_evaluate, train_step

TASKS = {
    "train": train_and_evaluate,
    "eval": _tasks.evaluate,
    "export": _tasks.export,
    "diagnose": diagnostics.diagnose,
    "select_kernels": _select_kernels,
}


def run_task(config, workdir: str):
  name = config.get("task", "train")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; valid: {', '.join(sorted(TASKS))}")
  return TASKS[name](config, workdir)
