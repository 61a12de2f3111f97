"""A TFDS builder for the built-in synthetic tasks, written as array_record (no TensorFlow needed).

    builder = prepare_synthetic("sort", data_dir)          # or SyntheticTasks(config=..., ...)
    cfg.source, cfg.name, cfg.data_dir = "tfds", "synthetic_tasks/sort", data_dir
    ds = data.get_dataset(cfg, "train", ...)                # reads through tfds.data_source

The records are those of `data._synthetic.generate` for the same task, digits, sizes and seed, so a
materialised dataset trains exactly like the in-memory one (up to record order, which TFDS shuffles
when writing and the pipeline shuffles again anyway). Importing this module registers the builder
name `synthetic_tasks`; after preparation the files are readable without it.
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from synthetic import _tasks as _synthetic


@dataclasses.dataclass(eq=False)
class SyntheticTasksConfig(tfds.core.BuilderConfig):
  task: str = "sort"
  min_digits: int | None = None
  max_digits: int | None = None
  train_size: int = 50_000
  test_size: int = 1_000
  seed: int = 0
  eval_fraction: float = 0.1


class SyntheticTasks(tfds.core.GeneratorBasedBuilder):
  """sort / reverse / add problems with exact answers; splits "train" and "test" share no problem."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticTasksConfig(name=t, task=t) for t in _synthetic.TASKS]

  # tfds looks for a checksums file next to the builder's code, and on the way imports
  # `importlib_resources`, which may be absent; nothing is downloaded here, so there is nothing to find.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` wants metadata files next to the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                             "response": tfds.features.Text()}),
        supervised_keys=("prompt", "response"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in _synthetic.SPLITS}

  def _generate_examples(self, split):
    c = self.builder_config
    size = c.train_size if split == "train" else c.test_size
    records = _synthetic.generate(c.task, split, size, seed=c.seed, min_digits=c.min_digits,
                                  max_digits=c.max_digits, eval_fraction=c.eval_fraction)
    for i, record in enumerate(records):
      yield i, record


def prepare_synthetic(task: str, data_dir: str, **kwargs) -> SyntheticTasks:
  """Writes `synthetic_tasks/<task>` under `data_dir` as array_record.

  kwargs override `SyntheticTasksConfig` fields and then name the config, e.g. `sort_max_digits8` for
  `max_digits=8`, so that differently made datasets never share a directory.
  """
  config = task
  if kwargs:
    name = "_".join([task] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
    config = SyntheticTasksConfig(name=name, task=task, **kwargs)
  builder = SyntheticTasks(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
