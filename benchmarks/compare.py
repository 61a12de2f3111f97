"""Runs a project benchmark and its PyTorch peer on the same shapes and prints both JSON lines and the ratios.

    python benchmarks/compare.py lora_sft [full_sft lora_dpo galore_sft]   # env: SIZE, B, T, STEPS, PEER
PEER is the peer script (default: ../shared/bench/peers_torch.py); it needs torch, transformers, peft.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.environ.get("PEER", os.path.join(HERE, "..", "..", "shared", "bench", "peers_torch.py"))


def run(cmd):
  out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
    return None
  return json.loads(lines[-1])


def main():
  for mode in sys.argv[1:] or ["full_sft"]:
    ours = run([sys.executable, os.path.join(HERE, "bench_train.py"), mode])
    peer = run([sys.executable, PEER, mode])
    print(json.dumps(ours))
    print(json.dumps(peer))
    if ours and peer:
      print(json.dumps({"mode": mode, "size": ours["size"],
                        "speedup_vs_peer": round(peer["step_ms"] / ours["step_ms"], 2),
                        "memory_vs_peer": round(ours["peak_mem_GiB"] / peer["peak_mem_GiB"], 2)}), flush=True)


if __name__ == "__main__":
  main()
