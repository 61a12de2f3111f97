"""Runs a training config in a fresh process (device count, kill-and-resume tests).

    python tests/train_runner.py CONFIG_FILE:ARG WORKDIR OUT.npz '{"total_steps": 8, "mesh.fsdp": 2}'

Writes the final trainable params (flattened by path) and the last logged loss to OUT.npz.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def apply_overrides(config, overrides: dict):
  for key, val in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = val
  return config


def devices_flags(devices: int) -> str:
  """XLA_FLAGS of this process (the tests' compile settings) with `devices` simulated CPU devices."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def env(devices: int = 1) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=devices_flags(devices))


def run(spec: str, workdir, out, overrides: dict, devices: int = 1) -> dict:
  """Runs a config to completion in a fresh process; returns the arrays it wrote to `out`."""
  r = subprocess.run([sys.executable, __file__, spec, str(workdir), str(out), json.dumps(overrides)],
                     cwd=ROOT, env=env(devices), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  with np.load(out) as f:
    return dict(f)


def _start_processes(spec: str, workdir, out, overrides: dict, processes: int, devices: int, **popen):
  import socket   # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  return [subprocess.Popen([sys.executable, __file__, spec, str(workdir), str(out), json.dumps(overrides)],
                           cwd=ROOT, env=dict(env(devices), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                              JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
                           **popen)
          for i in range(processes)]


def run_processes(spec: str, workdir, out, overrides: dict, processes: int = 2, devices: int = 4,
                  timeout: float = 900) -> dict:
  """Runs a config as `processes` JAX processes of `devices` CPU devices each, joined through
  `jax.distributed` on 127.0.0.1 (CPU collectives over gloo); process 0 writes `out`."""
  procs = _start_processes(spec, workdir, out, overrides, processes, devices, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    # Without XLA's native stack frames and gloo's connection lines, the Python error shows.
    shown = "\n".join(l for l in log.splitlines() if not l.lstrip().startswith(("@ 0x", "[Gloo]")))
    assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{shown[-6000:]}"
  with np.load(out) as f:
    return dict(f)


def _wait_for_checkpoint(workdir, step: int, procs, timeout: float) -> None:
  """Returns as soon as checkpoint `step` is committed (orbax renames it into place)."""
  ckpts = os.path.join(str(workdir), "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    done = os.path.isdir(os.path.join(ckpts, str(step)))
    if done and not any(n.startswith(f"{step}.") for n in os.listdir(ckpts)):
      return
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), "the run finished (or failed) before it could be killed"
  raise AssertionError(f"no checkpoint {step} within {timeout} s")


def kill_after_checkpoint(spec: str, workdir, out, overrides: dict, step: int, timeout: float = 600) -> None:
  """Starts a run and SIGKILLs it as soon as checkpoint `step` is committed."""
  proc = subprocess.Popen([sys.executable, __file__, spec, str(workdir), str(out), json.dumps(overrides)],
                          cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(workdir, step, [proc], timeout)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(out), "a killed run must not have written its results"


def kill_one_process_after_checkpoint(spec: str, workdir, out, overrides: dict, step: int, victim: int = 1,
                                      processes: int = 2, devices: int = 4, timeout: float = 600) -> None:
  """Starts a multi-process run and SIGKILLs process `victim` as soon as checkpoint `step` is committed;
  the others, left waiting on collectives with a dead peer, are then killed too, as a cluster scheduler
  ends a job one of whose tasks died."""
  procs = _start_processes(spec, workdir, out, overrides, processes, devices, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    _wait_for_checkpoint(workdir, step, procs, timeout)
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait()
    time.sleep(1.0)        # the survivors run on into the dead peer (a collective, a save) before their end
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait()
  assert not os.path.exists(out), "a killed run must not have written its results"


def main():
  spec, workdir, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
  import jax
  import peft
  import train_lib
  from train_lib import distributed
  distributed.initialize()
  config = apply_overrides(load_config(spec), overrides)
  summary = train_lib.train_and_evaluate(config, workdir)
  params = summary["state"].params
  if jax.process_count() > 1:    # shards live on other processes: gather them
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  flat = peft.flatten(jax.device_get(params))
  if jax.process_index() != 0:
    return
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  np.savez(out, **{"param/" + k: np.asarray(v) for k, v in flat.items()},
           losses=np.asarray([r["loss"] for r in records if "loss" in r]),
           resumed_from=np.asarray(summary.get("resumed_from", -1)),
           devices=np.asarray(jax.device_count()), processes=np.asarray(jax.process_count()))


if __name__ == "__main__":
  main()
