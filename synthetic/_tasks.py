"""Built-in synthetic tasks with exact answers, and a character tokenizer, so demos run offline.

Each task maps a *problem* string to a unique answer:

    sort     sort:31415=      ->  11345       the digits in ascending order
    reverse  reverse:31415=   ->  51413       the digits in reverse order
    add      add:123+4567=    ->  4690        decimal addition of two numbers

An example is `{"prompt": "sort:31415=", "response": "11345"}`; `task.check(prompt, response)` recomputes
the answer from the prompt (never from a stored label) and compares exactly, so exact-match accuracy of a
generated response is well defined.

**Held-out split.** A problem belongs to the held-out split iff

    u = blake2b("{task}:{problem}") / 2**64 < eval_fraction

so train and held-out never share a problem, whatever the seed, the sizes or the length range (the split is
a property of the problem, not of how it was drawn). Within a split, problems are distinct: `train_size`
counts problems, which is what low-data experiments vary.

**Default.** `sort` with 3-6 digits: about 17 tokens per example, learnable by a ~3M-parameter decoder on
CPU in a few minutes, and sorting cannot be solved by copying, so accuracy measures learning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib
from typing import Callable

import numpy as np


# ------------------------------------------------------------------------------------------------
# Character tokenizer.
# ------------------------------------------------------------------------------------------------

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<eos>")
_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=<>()[]:;,.?!\n"


class CharTokenizer:
  """One id per character; ids 0, 1, 2 are pad, bos, eos. Same protocol as `data.load_tokenizer`."""

  chat_template = None

  def __init__(self, chars: str = _CHARS):
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer characters must be distinct")
    self.chars = chars
    self._ids = {c: i + len(_SPECIALS) for i, c in enumerate(chars)}

  @property
  def vocab_size(self) -> int:
    return len(_SPECIALS) + len(self.chars)

  pad_id = PAD
  bos_id = BOS
  eos_id = EOS
  add_bos_token = True               # every example starts with bos
  special_ids = frozenset({EOS})     # no end-of-turn tokens but eos

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    try:
      ids = [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the CharTokenizer vocabulary "
                       f"{self.chars!r}") from None
    return [BOS] * add_bos + ids + [EOS] * add_eos

  def decode(self, ids, skip_special: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < len(_SPECIALS):
        if not skip_special:
          out.append(_SPECIALS[i])
      else:
        out.append(self.chars[i - len(_SPECIALS)])
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Tasks.
# ------------------------------------------------------------------------------------------------

def _number(rng: np.random.Generator, digits: int) -> int:
  """Uniform over numbers with exactly `digits` digits (no leading zero; 1 digit includes 0)."""
  lo = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(lo, 10 ** digits))


def _digit_string(rng: np.random.Generator, lo: int, hi: int) -> str:
  n = int(rng.integers(lo, hi + 1))
  return "".join(map(str, rng.integers(0, 10, size=n)))


def _two_numbers(rng: np.random.Generator, lo: int, hi: int) -> str:
  a = _number(rng, int(rng.integers(lo, hi + 1)))
  b = _number(rng, int(rng.integers(lo, hi + 1)))
  return f"{a}+{b}"


def _add(problem: str) -> str:
  a, b = problem.split("+")
  return str(int(a) + int(b))


@dataclasses.dataclass(frozen=True)
class Task:
  """A problem sampler, its exact solver and the prompt format `{name}:{problem}=`."""
  name: str
  sample: Callable[[np.random.Generator, int, int], str]   # (rng, min_digits, max_digits) -> problem
  solve: Callable[[str], str]
  problem_re: str                                          # what a well-formed problem looks like
  digits: tuple[int, int]                                  # default (min_digits, max_digits)

  def prompt(self, problem: str) -> str:
    return f"{self.name}:{problem}="

  def problem_of(self, prompt: str) -> str:
    m = re.fullmatch(rf"{re.escape(self.name)}:({self.problem_re})=", prompt)
    if m is None:
      raise ValueError(f"not a {self.name!r} prompt: {prompt!r}")
    return m.group(1)

  def answer(self, prompt: str) -> str:
    return self.solve(self.problem_of(prompt))

  def check(self, prompt: str, response: str) -> bool:
    """Exact match of `response` with the answer recomputed from `prompt`."""
    return response == self.answer(prompt)


TASKS: dict[str, Task] = {
    "sort": Task("sort", _digit_string, lambda p: "".join(sorted(p)), r"[0-9]+", (3, 6)),
    "reverse": Task("reverse", _digit_string, lambda p: p[::-1], r"[0-9]+", (3, 6)),
    "add": Task("add", _two_numbers, _add, r"[0-9]+\+[0-9]+", (1, 4)),
}

SPLITS = {"train": 0, "test": 1}
_SPLIT_ALIASES = {"train": "train", "test": "test", "eval": "test", "validation": "test"}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown synthetic task {name!r}; valid: {', '.join(TASKS)}")
  return TASKS[name]


def canonical_split(split: str) -> str:
  if split not in _SPLIT_ALIASES:
    raise ValueError(f"unknown split {split!r} for a synthetic task; valid: {', '.join(_SPLIT_ALIASES)}")
  return _SPLIT_ALIASES[split]


def is_held_out(task: str, problem: str, eval_fraction: float = 0.1) -> bool:
  """The split is a hash of the problem, so no problem is ever in both splits."""
  h = hashlib.blake2b(f"{task}:{problem}".encode(), digest_size=8).digest()
  return int.from_bytes(h, "little") < eval_fraction * 2.0 ** 64


def generate(task: str, split: str, n: int, *, seed: int = 0, min_digits: int | None = None,
             max_digits: int | None = None, eval_fraction: float = 0.1) -> list[dict]:
  """`n` distinct problems of `split` as `{"prompt", "response"}` records, reproducible from `seed`.

  Lengths are drawn uniformly, so short lengths run out of distinct problems first (sort has 900
  three-digit training problems) and the rest of the set shifts to longer ones. The first `k` records
  do not depend on `n`, so a smaller set is a prefix of a larger one.
  """
  t = get_task(task)
  split = canonical_split(split)
  lo, hi = t.digits
  lo = lo if min_digits is None else min_digits
  hi = hi if max_digits is None else max_digits
  if not 1 <= lo <= hi:
    raise ValueError(f"need 1 <= min_digits <= max_digits, got {lo}, {hi}")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  want_held_out = split == "test"
  rng = np.random.default_rng([seed, SPLITS[split], zlib.crc32(task.encode())])
  seen, out = set(), []
  # Rejection sampling: a small problem space shows up as a stall, which we report instead of looping.
  budget = 50 * n + 10_000
  while len(out) < n:
    if budget == 0:
      raise ValueError(f"could draw only {len(out)} distinct {split} problems of {task!r} with "
                       f"{lo}-{hi} digits (asked for {n}); widen the digit range or ask for fewer")
    budget -= 1
    problem = t.sample(rng, lo, hi)
    if problem in seen or is_held_out(task, problem, eval_fraction) != want_held_out:
      continue
    seen.add(problem)
    out.append({"prompt": t.prompt(problem), "response": t.solve(problem)})
  return out
