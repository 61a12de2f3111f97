import os
import sys

# The project is run from the repo root (its `peft`, `data`, `losses` shadow PyPI names on purpose).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A threaded BLAS on 2 shared cores makes small float64 SVDs hundreds of times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Many tests (and the trainer subprocesses they start, which inherit this) compile the same tiny-model
# steps: a persistent compilation cache shared by the xdist workers compiles each once per suite run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, "tests", ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The tests' models are tiny: compiling dominates their time and running them does not. LLVM without
# optimisation halves the CPU time of compilation (XLA's own HLO passes still run, so the numerics are the
# same computations). Subprocesses inherit it; `devices_flags` adds a device count to it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import pytest  # noqa: E402


@pytest.fixture
def tiny_model():
  """make(seed=0, **DecoderConfig.tiny overrides) -> (model, params): the tiny decoder the tests share
  (D=64, L=2, H=4, KV=2, F=176 unless overridden)."""
  import jax  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top

  def make(seed: int = 0, **overrides):
    model = models.Decoder(models.DecoderConfig.tiny(**overrides))
    return model, jax.jit(model.init)(jax.random.PRNGKey(seed))
  return make


@pytest.fixture
def smoke_config():
  """make(module=configs.sft, arg='model=tiny,smoke') -> a seconds-long config of an experiment file."""
  from configs import sft  # pylint: disable=g-import-not-at-top

  def make(module=sft, arg: str = "model=tiny,smoke"):
    return module.get_config(arg)
  return make
