r"""Dataset formats: a record of a common format -> the canonical record `data._turns` / `data._preference` read.

`config.format` names one of `FORMATS`, or "auto" (the default): the format is then detected from the
fields of the first record of a split and printed once (`detect`). `data/FORMATS.md` shows one record
of each.

    fields                    the configured field names (`prompt_field`, `response_field`, `messages_field`,
                              `chosen_field`, ...): the project's own records, e.g. {"prompt", "response"}
    trl                       TRL's dataset types, standard (strings) or conversational (message lists):
                              prompt/completion, text, messages, prompt/chosen/rejected, chosen/rejected (implicit
                              prompt, extracted as `trl.extract_prompt` does), prompt/completion/label
    messages                  {"messages": [...]}: TRL's conversational language modeling and OpenAI's chat
                              format (content parts joined, "developer" read as "system")
    alpaca                    {"instruction", "input", "output"}: Alpaca's prompt template, with or without input
    sharegpt                  {"conversations": [{"from", "value"}]}: human/gpt/system (and user/assistant/tool)
    hh_rlhf                   {"chosen", "rejected"}: "\n\nHuman: ...\n\nAssistant: ..." transcripts
    ultrafeedback_binarized   {"prompt", "chosen": [msgs], "rejected": [msgs], "score_chosen", "score_rejected"}
    ultrafeedback             {"instruction", "completions": [{"response", "overall_score" | ...}]}: listwise

Which formats fit which data (`pref_kind`): SFT reads fields, trl, messages, alpaca, sharegpt, hh_rlhf
(the chosen transcript) and ultrafeedback_binarized (its `messages`, else the chosen conversation);
pairwise reads fields, trl, hh_rlhf, ultrafeedback_binarized; unpaired fields and trl; listwise fields
and ultrafeedback.

Canonical records: SFT as in `data._turns` ({"prompt", "completion"} | {"text"} | {"messages"});
preference records with the default field names ({"prompt", "chosen", "rejected"} | {"prompt",
"completion", "label"} | {"prompt", "responses", "scores"}), the record's other fields kept. A malformed
record raises a `DataError` naming the field of the original format.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

from data._sources import DataError

FORMATS = ("auto", "fields", "trl", "messages", "alpaca", "sharegpt", "hh_rlhf", "ultrafeedback_binarized",
           "ultrafeedback")
SFT_FORMATS = ("fields", "trl", "messages", "alpaca", "sharegpt", "hh_rlhf", "ultrafeedback_binarized")
PREF_FORMATS = {"pairwise": ("fields", "trl", "hh_rlhf", "ultrafeedback_binarized"),
                "unpaired": ("fields", "trl"), "listwise": ("fields", "ultrafeedback")}

# Stanford Alpaca's prompt templates (its `PROMPT_DICT`).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# ------------------------------------------------------------------------------------------------
# Detection.
# ------------------------------------------------------------------------------------------------

def _is_messages(x: Any, key: str = "role") -> bool:
  return isinstance(x, list) and bool(x) and isinstance(x[0], dict) and key in x[0]


def _has(record: dict, *names: str) -> bool:
  return all(record.get(n) is not None for n in names)


def detect(record: Any, cfg) -> str:
  """The format of a record, from its fields ("fields" when nothing else fits: its errors then name the
  configured fields)."""
  if not isinstance(record, dict):
    return "fields"
  kind = cfg.pref_kind
  r = record
  if kind is None:
    if cfg.messages_field or _has(r, cfg.prompt_field, cfg.response_field):
      return "fields"
    if _is_messages(r.get("chosen")) and ("score_chosen" in r or "score_rejected" in r):
      return "ultrafeedback_binarized"
    if _has(r, "messages"):
      return "messages"
    if _has(r, "conversations"):
      return "sharegpt"
    if _has(r, "instruction", "output"):
      return "alpaca"
    if _has(r, "prompt", "completion") or isinstance(r.get("text"), str):
      return "trl"
    if isinstance(r.get("chosen"), str) and r["chosen"].startswith("\n\nHuman:"):
      return "hh_rlhf"
    if _is_messages(r.get("chosen")):
      return "ultrafeedback_binarized"
    return "fields"
  if kind == "pairwise":
    if _is_messages(r.get("chosen")) and ("score_chosen" in r or "score_rejected" in r):
      return "ultrafeedback_binarized"
    if isinstance(r.get("chosen"), str) and r["chosen"].startswith("\n\nHuman:") and "prompt" not in r:
      return "hh_rlhf"
    if (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field) != ("prompt", "chosen", "rejected"):
      return "fields"
    return "trl" if _has(r, "chosen", "rejected") else "fields"
  if kind == "unpaired":
    default = (cfg.prompt_field, cfg.completion_field, cfg.label_field) == ("prompt", "completion", "label")
    return "trl" if default and _has(r, "prompt", "completion", "label") else "fields"
  if _has(r, "instruction", "completions") and not _has(r, cfg.responses_field):
    return "ultrafeedback"
  return "fields"


def check_format(fmt: str, pref_kind: str | None) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown data format {fmt!r}; valid: {', '.join(FORMATS)}")
  valid = SFT_FORMATS if pref_kind is None else PREF_FORMATS[pref_kind]
  if fmt != "auto" and fmt not in valid:
    raise ValueError(f"format {fmt!r} holds no {pref_kind or 'SFT'} data; valid for it: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------------
# Field checks naming the original field.
# ------------------------------------------------------------------------------------------------

def _get(record: dict, name: str, kind, what: str | None = None) -> Any:
  if not isinstance(record, dict):
    raise DataError("wrong_type", f"a record must be a mapping, got {type(record).__name__}")
  if record.get(name) is None:
    raise DataError("missing_field", f"no {name!r} field (fields: {sorted(record)})")
  value = record[name]
  if not isinstance(value, kind):
    want = what or " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise DataError("wrong_type", f"{name!r} must be {want}, got {type(value).__name__}")
  return value


def _columns_to_rows(value: Any, name: str) -> Any:
  """TFDS / Arrow store a list of messages as columns: {"role": [...], "content": [...]}."""
  if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
    try:
      return [dict(zip(value, vals)) for vals in zip(*value.values(), strict=True)]
    except ValueError:
      raise DataError("bad_messages", f"{name!r} columns have different lengths") from None
  return value


def _content(value: Any, where: str) -> str:
  """OpenAI content: a string, null (a tool call), or a list of parts whose text parts are joined."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    parts = []
    for k, part in enumerate(value):
      if isinstance(part, str):
        parts.append(part)
      elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        parts.append(part["text"])
      else:
        raise DataError("bad_messages", f"{where}[{k}] is not a text part {{'type': 'text', 'text': str}}")
    return "".join(parts)
  raise DataError("bad_messages", f"{where} must be a string or a list of text parts, got {type(value).__name__}")


def _chat(record: dict, name: str, *, role_key: str = "role", content_key: str = "content",
          roles: dict | None = None) -> list[dict]:
  value = _columns_to_rows(_get(record, name, (list, dict), "a list of messages"), name)
  if not isinstance(value, list) or not value:
    raise DataError("bad_messages", f"{name!r} must be a non-empty list of messages")
  out = []
  for k, m in enumerate(value):
    if not isinstance(m, dict):
      raise DataError("bad_messages", f"{name}[{k}] is not a message (a mapping), got {type(m).__name__}")
    role = m.get(role_key)
    if not isinstance(role, str):
      raise DataError("bad_messages", f"{name}[{k}] has no {role_key!r} string")
    if roles is not None:
      if role.lower() not in roles:
        raise DataError("bad_messages", f"{name}[{k}].{role_key} is {role!r}; known: {', '.join(sorted(roles))}")
      role = roles[role.lower()]
    elif role == "developer":
      role = "system"
    if content_key not in m:
      raise DataError("bad_messages", f"{name}[{k}] has no {content_key!r}")
    msg = {kk: v for kk, v in m.items() if kk not in (role_key, content_key) and v is not None}
    out.append({**msg, "role": role, "content": _content(m[content_key], f"{name}[{k}].{content_key}")})
  return out


def _hh(record: dict, name: str) -> list[dict]:
  text = _get(record, name, str)
  if not text.startswith("\n\nHuman:"):
    raise DataError("bad_messages", f"{name!r} is not an HH transcript: it does not start with '\\n\\nHuman:'")
  parts = HH_TURN.split(text)[1:]   # role, text, role, text...
  msgs = [{"role": "user" if role == "Human" else "assistant", "content": body.strip()}
          for role, body in zip(parts[::2], parts[1::2])]
  if msgs[-1]["role"] != "assistant":
    raise DataError("bad_messages", f"{name!r} does not end with an '\\n\\nAssistant:' turn")
  return msgs


def template_kwargs(record: dict) -> dict:
  """What a record gives its chat template beside the messages, as TRL passes it: `tools` (a list, or
  a JSON string of one) and the keywords of `chat_template_kwargs` (e.g. `enable_thinking`)."""
  out = {}
  tools = record.get("tools")
  if isinstance(tools, str):
    try:
      tools = json.loads(tools)
    except json.JSONDecodeError as e:
      raise DataError("wrong_type", f"'tools' is a string but not JSON: {e}") from None
  if tools is not None:
    if not isinstance(tools, list):
      raise DataError("wrong_type", f"'tools' must be a list of tool schemas, got {type(tools).__name__}")
    out["tools"] = tools
  kwargs = record.get("chat_template_kwargs")
  if kwargs is not None:
    if not isinstance(kwargs, dict):
      raise DataError("wrong_type", f"'chat_template_kwargs' must be a mapping, got {type(kwargs).__name__}")
    out.update(kwargs)
  return out


# ------------------------------------------------------------------------------------------------
# SFT.
# ------------------------------------------------------------------------------------------------

def sft_record(record: Any, fmt: str, cfg) -> dict:
  """The canonical SFT record (`data._turns`) of a record in format `fmt` (not "auto"); a conversation
  carries its `template_kwargs`."""
  if not isinstance(record, dict):
    raise DataError("wrong_type", f"a record must be a mapping, got {type(record).__name__}")
  canonical = _sft_record(record, fmt, cfg)
  if "text" not in canonical and not isinstance(canonical.get("prompt"), str):
    extra = template_kwargs(record)
    if extra:
      canonical["template_kwargs"] = extra
  return canonical


def _sft_record(record: dict, fmt: str, cfg) -> dict:
  if fmt == "fields":
    if cfg.messages_field:
      return {"messages": _chat(record, cfg.messages_field)}
    prompt = _get(record, cfg.prompt_field, str)
    return {"prompt": prompt, "completion": _get(record, cfg.response_field, str)}
  if fmt == "trl":
    if "messages" in record and "prompt" not in record:
      return {"messages": _chat(record, "messages")}
    if "text" in record and "prompt" not in record:
      return {"text": _get(record, "text", str)}
    prompt = _get(record, "prompt", (str, list, dict))
    if isinstance(prompt, str):
      return {"prompt": prompt, "completion": _get(record, "completion", str)}
    return {"prompt": _chat(record, "prompt"), "completion": _chat(record, "completion")}
  if fmt == "messages":
    return {"messages": _chat(record, "messages")}
  if fmt == "alpaca":
    instruction = _get(record, "instruction", str)
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
      raise DataError("wrong_type", f"'input' must be str, got {type(extra).__name__}")
    prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    return {"prompt": prompt, "completion": _get(record, "output", str)}
  if fmt == "sharegpt":
    msgs = _chat(record, "conversations", role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    system = record.get("system")
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
      msgs = [{"role": "system", "content": system}] + msgs
    return {"messages": msgs}
  if fmt == "hh_rlhf":
    return {"messages": _hh(record, "chosen")}
  if fmt == "ultrafeedback_binarized":
    return {"messages": _chat(record, "messages" if record.get("messages") is not None else "chosen")}
  raise ValueError(f"format {fmt!r} holds no SFT data; valid for it: {', '.join(SFT_FORMATS)}")


def prompt_and_answer(canonical: dict) -> tuple[Any, str] | None:
  """(prompt: text or messages, the answer a model should generate) of a canonical SFT record, for
  evaluation by generation; None for plain text (no prompt)."""
  if "text" in canonical:
    return None
  if "messages" in canonical:
    return canonical["messages"][:-1], canonical["messages"][-1]["content"]
  completion = canonical["completion"]
  if isinstance(completion, list):
    return canonical["prompt"], "".join(m["content"] for m in completion)
  return canonical["prompt"], completion


# ------------------------------------------------------------------------------------------------
# Preference.
# ------------------------------------------------------------------------------------------------

def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected) from an implicit prompt, as `trl.extract_prompt` (TRL 1.16) splits it:
  the longest common prefix (characters, or whole messages), a space before the split going with the
  completions. Where one is a prefix of the other TRL's loop ends on the last index; so does this. (TRL
  also looks at `chosen[-1]` when the very first items differ; here nothing is shared then.)"""
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      if idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


def _implicit(record: dict, as_chat: bool) -> dict:
  if as_chat:
    chosen, rejected = _chat(record, "chosen"), _chat(record, "rejected")
  else:
    chosen, rejected = _get(record, "chosen", str), _get(record, "rejected", str)
  prompt, c, r = extract_prompt(chosen, rejected)
  if not prompt:
    raise DataError("bad_messages", "'chosen' and 'rejected' share no prompt (implicit-prompt records must "
                    "start with the same conversation)")
  return {"prompt": prompt, "chosen": c, "rejected": r}


def _score(entry: dict, where: str) -> float | None:
  for key in ("overall_score", "fine-grained_score", "score", "rating"):
    if entry.get(key) is not None:
      x = entry[key]
      if isinstance(x, str):
        try:
          x = float(x)
        except ValueError:
          raise DataError("bad_score", f"{where}.{key} is not a number: {x!r}") from None
      if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise DataError("bad_score", f"{where}.{key} is not a number: {x!r}")
      return float(x)
  ratings = []
  for aspect in (entry.get("annotations") or {}).values():
    rating = aspect.get("Rating") if isinstance(aspect, dict) else None
    try:
      ratings.append(float(rating))
    except (TypeError, ValueError):
      continue
  ratings = [x for x in ratings if math.isfinite(x)]
  return sum(ratings) / len(ratings) if ratings else None


def preference_record(record: Any, fmt: str, cfg, *, chat: bool) -> dict:
  """The canonical preference record of a record in format `fmt` (not "auto", not "fields"). `chat`:
  a chat template is available (HH transcripts then become conversations, else stay text)."""
  if not isinstance(record, dict):
    raise DataError("wrong_type", f"a record must be a mapping, got {type(record).__name__}")
  kind = cfg.pref_kind
  out = dict(record)
  if fmt == "trl":
    if kind == "pairwise":
      chosen = _get(record, "chosen", (str, list), "a string or a list of messages")
      prompt = record.get("prompt")
      mismatch = isinstance(prompt, (str, list)) and isinstance(prompt, str) != isinstance(chosen, str)
      if prompt is None or mismatch:   # trl.maybe_extract_prompt
        out.update(_implicit(record, not isinstance(chosen, str)))
      return out
    return out   # unpaired: TRL's names are the defaults
  if fmt == "hh_rlhf":
    chosen, rejected = _hh(record, "chosen"), _hh(record, "rejected")
    if chosen[:-1] != rejected[:-1]:
      raise DataError("bad_messages", "'chosen' and 'rejected' transcripts differ before their last "
                      "'\\n\\nAssistant:' turn")
    if chat:
      out.update(prompt=chosen[:-1], chosen=chosen[-1:], rejected=rejected[-1:])
    else:
      cut = record["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
      cut_r = record["rejected"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
      out.update(prompt=record["chosen"][:cut], chosen=record["chosen"][cut:], rejected=record["rejected"][cut_r:])
    return out
  if fmt == "ultrafeedback_binarized":
    out.update(_implicit(record, True))
    for key in ("score_chosen", "score_rejected"):
      x = record.get(key)
      if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise DataError("bad_score", f"{key!r} must be a number, got {x!r}")
    return out
  if fmt == "ultrafeedback":
    instruction = _get(record, "instruction", str)
    completions = _get(record, "completions", list)
    responses, scores = [], []
    for k, entry in enumerate(completions):
      if not isinstance(entry, dict) or not isinstance(entry.get("response"), str):
        raise DataError("wrong_type", f"completions[{k}] must be a mapping with a 'response' string")
      responses.append(entry["response"])
      scores.append(_score(entry, f"completions[{k}]"))
    out.update(prompt=[{"role": "user", "content": instruction}] if chat else instruction,
               responses=responses, scores=scores)
    out.pop("ranks", None)
    return out
  raise ValueError(f"format {fmt!r} holds no {kind} data; valid for it: {', '.join(PREF_FORMATS[kind])}")
