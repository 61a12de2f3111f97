import os
import sys

# The project is run from the repo root (its `peft`, `data`, `losses` shadow PyPI names on purpose).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A threaded BLAS on 2 shared cores makes small float64 SVDs hundreds of times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
