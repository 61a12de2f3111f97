"""Built-in tasks with exact answers (sort, reverse, add digit strings): SFT records, preference pairs,
unpaired and listwise records with graded wrong answers, a character tokenizer, and a TFDS builder that
materialises them as array_record files. Every number in the README's results can be reproduced offline
with them; `data` reads them as its `builtin` source.

    records = synthetic.generate("sort", "train", 1000, seed=0)    # [{"prompt", "response"}]
    synthetic.get_task("sort").check(prompt, response)             # the verifier
"""
from synthetic._tasks import TASKS, CharTokenizer, Task, canonical_split, generate, get_task, is_held_out
from synthetic._preference import KINDS, corrupt, generate_preference, wrong_digits

# Imported on first use: TFDS costs a second at import.
_LAZY = {"prepare_synthetic": "synthetic._tfds", "SyntheticTasks": "synthetic._tfds",
         "SyntheticTasksConfig": "synthetic._tfds"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'synthetic' has no attribute {name!r}")
