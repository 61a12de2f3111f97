"""Runs mergekit 0.1.5 itself on a merge YAML (runs inside .venv-ref).

    mergekit_yaml.py IN.npz OUT.npz --yaml=FILE --out_dir=DIR

`run_merge` on CPU writes DIR (safetensors + config.json); OUT is empty (the test reads DIR).
"""
import yaml
from _common import parse_args, save

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main():
  _, out, kw = parse_args()
  with open(kw["yaml"]) as f:
    config = MergeConfiguration.model_validate(yaml.safe_load(f))
  run_merge(config, kw["out_dir"], options=MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False,
                                                         write_model_card=False, quiet=True, random_seed=0))
  save(out)


if __name__ == "__main__":
  main()
