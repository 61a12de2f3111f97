"""Built-in preference tasks: the synthetic SFT tasks with graded wrong answers.

A problem of `data._synthetic` (sort / reverse / add) has one exact answer of d digits. A *corruption
with e errors* replaces e distinct digits of the answer by other digits, so its Hamming distance to the
answer is exactly e and it never verifies (a leading digit other than 0 stays non-zero, so a corruption
is not given away by its format):

    sort:31415=     answer 11345     1 error: 11385     2 errors: 71315     3 errors: 61390

Records, one per problem, in the default field names of `data.default_config()`:

    pairwise   {"prompt", "chosen": answer, "rejected": corruption}           e ~ U{1..d}
    unpaired   {"prompt", "completion", "label"}       the answer (label True) with probability
                                                       `desirable_fraction`, else a corruption
    listwise   {"prompt", "responses": [...], "scores": [...]}
               the answer and K - 1 distinct corruptions with e_k ~ U{1..d} errors, in random order;
               score = -(wrong digits): the answer scores 0 and corruptions with as many errors tie

so a ranking by score is a ranking by closeness to the answer, and `wrong_digits` (recomputing the
answer from the prompt) is the verifier of the graded task.

Problems and the held-out split are those of `data._synthetic.generate` for the same arguments (the hash
split): preference train and test share no problem, the SFT and preference sets of a split hold the same
problems, and the first k records do not depend on n.
"""
from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np

from synthetic import _tasks as _synthetic

KINDS = ("pairwise", "unpaired", "listwise")
_DIGITS = "0123456789"


def corrupt(answer: str, errors: int, rng: np.random.Generator) -> str:
  """`answer` with `errors` distinct digits replaced by other digits (Hamming distance `errors`)."""
  if not 1 <= errors <= len(answer):
    raise ValueError(f"need 1 <= errors <= {len(answer)} (the digits of {answer!r}), got {errors}")
  out = list(answer)
  for i in rng.choice(len(answer), size=errors, replace=False):
    # A leading digit stays non-zero when it was: "0690" would be wrong by its format alone.
    banned = {answer[i]} | ({"0"} if i == 0 and len(answer) > 1 and answer[0] != "0" else set())
    choices = [d for d in _DIGITS if d not in banned]
    out[i] = choices[int(rng.integers(len(choices)))]
  return "".join(out)


def wrong_digits(answer: str, response: str) -> int:
  """Positions where `response` differs from `answer`, plus the difference in length."""
  return sum(a != b for a, b in zip(answer, response)) + abs(len(answer) - len(response))


def score(task: str, prompt: str, response: str) -> float:
  """The listwise score of a response: -(wrong digits), with the answer recomputed from the prompt."""
  return -float(wrong_digits(_synthetic.get_task(task).answer(prompt), response))


def _distinct_corruptions(answer: str, errors: list[int], rng: np.random.Generator) -> list[str]:
  seen, out = {answer}, []
  for e in errors:
    for _ in range(100):   # 1-digit answers have only 9 corruptions: after that a repeat is allowed
      bad = corrupt(answer, e, rng)
      if bad not in seen:
        break
    seen.add(bad)
    out.append(bad)
  return out


def generate_preference(task: str, split: str, n: int, kind: str, *, seed: int = 0, list_size: int = 4,
                        desirable_fraction: float = 0.5, min_digits: int | None = None,
                        max_digits: int | None = None, eval_fraction: float = 0.1,
                        fields: Mapping[str, str] | None = None) -> list[dict]:
  """`n` preference records of `split` (see the module docstring), reproducible from `seed`.

  `fields` renames the record keys (e.g. {"chosen": "good"}), so the records read back under a config's
  field names.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown preference kind {kind!r}; valid: {', '.join(KINDS)}")
  if kind == "listwise" and list_size < 2:
    raise ValueError(f"list_size must be >= 2 for listwise records, got {list_size}")
  if kind == "unpaired" and not 0.0 <= desirable_fraction <= 1.0:
    raise ValueError(f"desirable_fraction must be in [0, 1], got {desirable_fraction}")
  problems = _synthetic.generate(task, split, n, seed=seed, min_digits=min_digits, max_digits=max_digits,
                                 eval_fraction=eval_fraction)
  split_id = _synthetic.SPLITS[_synthetic.canonical_split(split)]
  # One stream per (task, split, kind), read record by record: a prefix of the records is stable.
  rng = np.random.default_rng([seed, split_id, zlib.crc32(task.encode()), zlib.crc32(kind.encode())])
  name = lambda k: (fields or {}).get(k, k)
  out = []
  for p in problems:
    prompt, answer = p["prompt"], p["response"]
    d = len(answer)
    if kind == "pairwise":
      rejected = corrupt(answer, int(rng.integers(1, d + 1)), rng)
      out.append({name("prompt"): prompt, name("chosen"): answer, name("rejected"): rejected})
    elif kind == "unpaired":
      good = bool(rng.random() < desirable_fraction)
      completion = answer if good else corrupt(answer, int(rng.integers(1, d + 1)), rng)
      out.append({name("prompt"): prompt, name("completion"): completion, name("label"): good})
    else:
      errors = [int(e) for e in rng.integers(1, d + 1, size=list_size - 1)]
      responses = [answer] + _distinct_corruptions(answer, errors, rng)
      scores = [0.0] + [-float(e) for e in errors]
      order = rng.permutation(list_size)
      out.append({name("prompt"): prompt, name("responses"): [responses[i] for i in order],
                  name("scores"): [scores[i] for i in order]})
  return out
