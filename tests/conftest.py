import os
import sys

# The project is run from the repo root (its `peft`, `data`, `losses` shadow PyPI names on purpose).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
