"""The trainer and the tasks of main.py: train state, the jitted sharded step, mesh rules, orbax checkpoints,
metrics, evaluation, generation, and the eval / export / diagnose / sweep / preselect tasks over a workdir.

`TASKS` maps `config.task` to a function `(config, workdir)`; main.py only dispatches through it
(`register_task` adds one).
"""
from train_lib.generation import generate
from train_lib.tasks import TASKS, register_task, run_task
from train_lib import preselect as _preselect  # noqa: F401  (registers the preselect task)
from train_lib.train import TrainState, model_outputs, train_and_evaluate, train_step
from train_lib import data_init as _data_init  # noqa: F401  (registers the data-driven init hook)
from train_lib.validate import ConfigError, UserError
