r"""Entry point: dispatches on config.task.

    python main.py --config=configs/sft.py --workdir=/tmp/sft [--config.total_steps=500 ...]
    python main.py --list            # the configs, what each is for, and its presets (also --help)

A config error (an unknown field, a value of the wrong type, an invalid option) is one short message
naming the valid choices, rc 2; `--verbosity=1` (or any --verbosity) shows the traceback as well.
"""
import ast
import difflib
import glob
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import data
import train_lib
from train_lib import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])

ROOT = os.path.dirname(os.path.abspath(__file__))
EXIT_CONFIG = 2


# =====================================================================================================
# --list / --help: the configs and their presets
# =====================================================================================================
def config_presets(path: str) -> dict:
  """The `parse_arg(arg, name=default, ...)` keywords of a config file, read from its source."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_arg":
      out = {}
      for kw in node.keywords:
        try:
          out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
          out[kw.arg] = ast.unparse(kw.value)
      return out
  return {}


def list_configs() -> str:
  lines = ["usage: python main.py --config=configs/NAME.py[:key=value,flag,...] --workdir=DIR "
           "[--config.FIELD=VALUE ...]", "", "configs (presets after the colon, with their defaults):"]
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)
    if name in ("__init__.py", "common.py"):
      continue
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    presets = config_presets(path)
    lines.append(f"  configs/{name:<16} {first}")
    if presets:
      lines.append("      presets: " + ", ".join(f"{k}={v!r}" for k, v in presets.items()))
  lines += ["", "paper recipes (configs/paper/, README \"Paper recipes\"; --config.dry_run=True compiles without weights):"]
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "[!_]*.py"))):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    lines.append(f"  configs/paper/{os.path.basename(path):<22} {doc.strip().splitlines()[0] if doc.strip() else ''}")
  lines += ["", "Every field can be overridden: --config.optim.learning_rate=1e-3; --helpfull lists the absl "
            "flags; the README documents the options."]
  return "\n".join(lines)


# =====================================================================================================
# Config errors: one short message
# =====================================================================================================
def _load_config_file(argv):
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_cfg_for_message", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def describe_override_error(argv) -> str | None:
  """For `--config.a.b=...` overrides naming no field: which name is wrong, and the valid ones there."""
  try:
    config = _load_config_file(argv)
  except Exception:   # pylint: disable=broad-except
    return None
  if config is None:
    return None
  for a in argv:
    if not a.startswith("--config."):
      continue
    dotted = a[len("--config."):].split("=", 1)[0]
    node, where = config, "config"
    for part in dotted.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"--config.{dotted}: {where} has no field {part!r}{hint}; valid: {', '.join(sorted(keys))}"
      node, where = node[part], f"{where}.{part}"
  return None


def _short(e: BaseException) -> str:
  if isinstance(e, (AttributeError, KeyError)) and e.args:
    return str(e.args[0]).strip().strip("'\"").replace("\\n", " ").replace("\n", " ")
  msg = str(e).strip()
  if "Traceback (most recent call last)" in msg:   # ml_collections embeds the config file's traceback
    head = msg.split("Traceback (most recent call last)")[0].strip()
    last = [l for l in msg.splitlines() if l.strip()][-1].strip()
    msg = f"{head} {last}"
  return msg.replace("\n", " ")


def parse_flags(argv):
  """absl's flag parsing, with config errors as one line (the traceback only with --verbosity)."""
  verbose = any(a.startswith(("--verbosity", "-v=")) for a in argv)
  if any(a in ("--list", "--help", "-h", "-help") for a in argv[1:]):
    print(list_configs())
    sys.exit(0)
  try:
    return FLAGS(argv)
  except Exception as e:   # pylint: disable=broad-except
    if verbose:
      raise
    detail = describe_override_error(argv)    # an override naming no field: which part, and the valid names
    print(f"config error: {detail or _short(e)}", file=sys.stderr)
    print("(python main.py --list shows the configs and presets; --verbosity=1 the traceback)", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def main(argv):
  del argv
  verbose = FLAGS["verbosity"].present
  if not verbose:   # orbax and absl are chatty at INFO; --verbosity=0 brings it back
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", FLAGS.config)
  distributed.initialize()      # several processes (a TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS & co.)
  try:
    train_lib.run_task(FLAGS.config, FLAGS.workdir)
  except (train_lib.UserError, data.DataError) as e:   # config, workdir and data errors: no traceback
    if verbose:
      raise
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
