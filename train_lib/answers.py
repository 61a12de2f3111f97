"""Answer extraction for generation tasks, as lm-evaluation-harness's GSM8K task filters and scores them.

    extract(text, STRICT)      # "#### 72" -> "72"; no match -> "[invalid]"
    extract(text, FLEXIBLE)    # the last number in the text
    gold_answer("... #### 1,234")  # -> "1,234" (normalised by `normalize` before comparing)
    is_correct(prediction, gold)   # exact match after lm-eval's gsm8k `regexes_to_ignore`, case-insensitive

`STRICT` is lm-eval's gsm8k "strict-match" filter (the first match of `#### (-?[0-9.,]+)`), `FLEXIBLE` its
"flexible-extract" (the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the first non-empty group of a match).
A user regex (`config.eval.answer_regex`) is applied the strict way: its first match, group 1 if it has
groups. Before exact match, both sides lose `,`, `$`, everything up to `#### ` and a final `.`, and compare
case-insensitively (the gsm8k task's `exact_match` arguments).
"""
from __future__ import annotations

import re

INVALID = "[invalid]"
STRICT = (r"#### (\-?[0-9\.\,]+)", 0)         # (pattern, which match: 0 first, -1 last)
FLEXIBLE = (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def extract(text: str, rule: tuple[str, int] = STRICT) -> str:
  """The answer `rule` finds in `text`, stripped; INVALID when nothing matches."""
  pattern, which = rule
  matches = re.findall(pattern, text)
  if not matches:
    return INVALID
  m = matches[which]
  if isinstance(m, tuple):             # several groups: the first that matched
    m = next((g for g in m if g), m[0])
  return m.strip()


def gold_answer(answer: str) -> str:
  """The reference of a GSM8K-style answer: the text after `#### `, else the whole answer."""
  return answer.split("####")[-1].strip() if "####" in answer else answer.strip()


def normalize(text: str) -> str:
  for pattern in _IGNORE:
    text = re.sub(pattern, "", text)
  return text.strip().lower()


def is_correct(prediction: str, gold: str) -> bool:
  return prediction != INVALID and normalize(prediction) == normalize(gold)


def rules(user_regex: str | None = None) -> dict[str, tuple[str, int]]:
  """The named extraction rules a generation task reports: strict and flexible, and `regex` if given."""
  out = {"strict_match": STRICT, "flexible_extract": FLEXIBLE}
  if user_regex:
    out["regex_match"] = (user_regex, 0)
  return out
