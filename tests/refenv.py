"""Calls the PyTorch reference stack (.venv-ref: torch, transformers, peft, trl, weightwatcher,
galore-torch) in a subprocess, so its `peft` never meets ours.

    out = refenv.run("hf_logits", {"tokens": tokens}, model_dir=str(d))

runs `tests/ref/hf_logits.py IN.npz OUT.npz --model_dir=...` with the reference interpreter; arrays go in
and come back through .npz files, scalars/strings through keyword arguments (passed as `--key=value`).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF_PYTHON = pathlib.Path(os.environ.get("REF_PYTHON", ROOT / ".venv-ref" / "bin" / "python"))
SCRIPTS = ROOT / "tests" / "ref"


def available() -> bool:
  return REF_PYTHON.exists()


def require() -> None:
  """Skips the calling test or fixture when the reference environment is missing."""
  import pytest  # pylint: disable=g-import-not-at-top
  if not available():
    pytest.skip(f"reference environment missing ({REF_PYTHON}); create it with `make ref-env`")


def needs_ref(fn):
  """Decorator form of `require` for tests that call `run` themselves."""
  import pytest  # pylint: disable=g-import-not-at-top
  return pytest.mark.skipif(not available(), reason="reference environment (.venv-ref) missing")(fn)


def run(script: str, arrays: dict | None = None, timeout: int = 600, **kwargs) -> dict[str, np.ndarray]:
  if not available():
    raise RuntimeError(f"reference environment missing ({REF_PYTHON}); create it with `make ref-env`")
  with tempfile.TemporaryDirectory() as tmp:
    inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(inp, **(arrays or {}))
    cmd = [str(REF_PYTHON), str(SCRIPTS / f"{script}.py"), inp, out]
    cmd += [f"--{k}={v}" for k, v in kwargs.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(SCRIPTS))
    if r.returncode:
      raise RuntimeError(f"reference script {script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    with np.load(out, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}

