"""Padding-free preference batches: token slots per step and padding fraction of the three layouts
(`config.data.pref_packing` = none | packed | shared_prompt), from the data pipeline alone (no model).

    python benchmarks/pref_packing.py --out=benchmarks/results/pref_packing.md

Data: the built-in preference task (pairwise and listwise K = 4, the shapes of configs/dpo.py and
configs/lipo.py) and a synthetic long-tailed pairwise set whose prompt and response lengths are lognormal
(token ids are random: only the lengths matter here). Per layout, over the first `--steps` training
batches: the token slots the model runs per step (rows x T), the real tokens among them (segment != 0;
a shared prompt counts once), the padding fraction 1 - real / slots, the rows per step, and the host
time to make a batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import data
from configs import dpo, lipo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "packed", "shared_prompt")


def lognormal_pairs(n: int, seq_len: int, seed: int = 0, prompt_median: float = 120.0,
                    response_median: float = 80.0, sigma: float = 1.0, vocab: int = 32000):
  """Pairwise examples bos + prompt + response + eos with lognormal prompt and response lengths; the
  prompt keeps its last half of seq_len at most, the responses are cut to fit (the pipeline's rules)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    p = int(min(max(1, rng.lognormal(np.log(prompt_median), sigma)), seq_len // 2))
    prompt = rng.integers(3, vocab, p)
    seqs = []
    for _ in range(2):
      r = int(min(max(1, rng.lognormal(np.log(response_median), sigma)), seq_len - p - 2))
      tokens = np.concatenate([[1], prompt, rng.integers(3, vocab, r), [2]]).astype(np.int32)
      weights = np.concatenate([np.zeros(1 + p), np.ones(r + 1)]).astype(np.float32)
      seqs.append(data.Example(tokens, weights))
    out.append(data.PreferenceExample(tuple(seqs), None, None, None))
  return out


def measure(ds, steps: int) -> dict:
  it = iter(ds)
  real, slots, rows, used, seq_tokens, host = [], [], [], [], [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    b = next(it)
    host.append(time.perf_counter() - t0)
    seg = b["segment_ids"]
    real.append(int(np.count_nonzero(seg)))
    slots.append(int(seg.size))
    rows.append(int(np.prod(seg.shape[:-1])))
    used.append(int(np.count_nonzero(seg.max(-1))))     # rows holding a token: what this batch needed
    index = b.get("seq_index")
    seq_tokens.append(int(np.count_nonzero(index >= 0)) if index is not None else real[-1])
  return {"slots": np.mean(slots), "real": np.mean(real), "padding": 1.0 - np.sum(real) / np.sum(slots),
          "rows": np.mean(rows), "used": np.mean(used), "max_used": max(used), "seq_tokens": np.mean(seq_tokens),
          "host_ms": 1e3 * np.median(host)}


def builtin(config, mode: str, train_size: int, pack_len: int | None = None):
  dc = config.data
  with dc.unlocked():
    dc.pref_packing = mode
    dc.train_size = train_size
    dc.pref_pack_len = pack_len
  tok = data.get_tokenizer(dc)
  return data.get_dataset(dc, "train", tokenizer=tok, batch_size=config.batch_size, seq_len=int(config.seq_len),
                          seed=0, packed_preferences=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pref_packing.md"))
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--train_size", type=int, default=5000)
  p.add_argument("--long_seq_len", type=int, default=2048)
  p.add_argument("--long_batch", type=int, default=16)
  a = p.parse_args()
  cases = []
  for label, cfg_fn, len_factor in (
      ("built-in sort, pairwise (configs/dpo.py)", lambda: dpo.get_config("model=small"), 1),
      ("built-in sort, pairwise (configs/dpo.py)", lambda: dpo.get_config("model=small"), 4),
      ("built-in sort, listwise K=4 (configs/lipo.py)", lambda: lipo.get_config("model=small"), 2)):
    c = cfg_fn()
    L = len_factor * int(c.seq_len)     # a shared prompt and its K completions must fit one packed row
    shape = f"B={c.batch_size}, T={c.seq_len}" + (f", packed rows L={L}" if len_factor > 1 else "")
    cases.append((label, shape, lambda mode, f=cfg_fn, L=L: builtin(f(), mode, a.train_size,
                                                                    L if mode != "none" else None)))
  long = lognormal_pairs(a.train_size, a.long_seq_len)
  lens = np.array([len(s.tokens) for e in long for s in e.seqs])
  shape = f"B={a.long_batch}, T={a.long_seq_len}"
  cases.append((f"lognormal pairs (prompt median 120, response median 80, sigma 1; sequence length "
                f"median {int(np.median(lens))}, p99 {int(np.percentile(lens, 99))})", shape,
                lambda mode: data.PreferenceDataset(long, kind="pairwise", batch_size=a.long_batch,
                                                    seq_len=a.long_seq_len, seed=0, pref_packing=mode)))
  lines = ["# Padding-free preference batches: tokens per step and padding", "",
           f"`python benchmarks/pref_packing.py` (data pipeline only; the first {a.steps} training batches, "
           f"{a.train_size} examples per set). *Slots* are the token positions the model runs per step "
           "(rows x T); *real* are those holding a token (a shared prompt counts once); *sequence tokens* are "
           "the tokens of the B x K sequences (what the padded layout calls real). Rows per group: automatic "
           "(the most the first epoch needs), one group. Host ms: median time to make a batch (Python, on "
           "a shared, loaded CPU: indicative only).", "",
           "| data | shape | layout | rows/step (needed: mean, max) | slots/step | real tokens/step | "
           "sequence tokens/step | padding | slots vs padded | host ms/batch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for label, shape, make in cases:
    base = None
    for mode in MODES:
      t0 = time.time()
      ds = make(mode)
      m = measure(ds, a.steps)
      base = base or m["slots"]
      lines.append(f"| {label} | {shape} | {mode} | {m['rows']:.0f} ({m['used']:.1f}, {m['max_used']}) | "
                   f"{m['slots']:.0f} | {m['real']:.0f} | "
                   f"{m['seq_tokens']:.0f} | {100 * m['padding']:.1f}% | {m['slots'] / base:.2f}x | "
                   f"{m['host_ms']:.2f} |")
      print(lines[-1], f"({time.time() - t0:.1f} s)", flush=True)
  lines += ["", "Shared-prompt savings grow with the prompt's share of a sequence and with K; packing's with "
            "the spread of lengths below T. The row count is static per run (jit shapes): the automatic count is the "
            "most rows a batch of the first epoch needs, so batches that need fewer carry empty rows (the gap "
            "between rows/step and the mean needed); `pref_pack_rows` sets it lower, and a batch that needs more "
            "rows gets the next multiple of it (one more compilation). Listwise K=4 at T=32: a prompt and four "
            "completions need more than 32 slots, so its packed rows are twice as long (`pref_pack_len`); "
            "longer rows also pack short pairs tighter (the pairwise L=128 rows), at the cost of attention "
            "over longer rows (packed rows take the masked attention path, not the plain causal one)."]
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("wrote", a.out)


if __name__ == "__main__":
  main()
