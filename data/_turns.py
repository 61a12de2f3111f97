"""Which text of an SFT record carries the loss: a canonical record -> text segments, each learned or not.

    segments, chat = sft_segments({"messages": [...]}, template, variables, assistant_only_loss=True)
    example = data._sft.encode_segments(segments, tokenizer, seq_len=..., chat=chat)

Canonical SFT records (what `data._formats` makes of every format, TRL's dataset types):

    {"prompt": str, "completion": str}        standard prompt-completion
    {"text": str}                             standard language modeling: every token learned
    {"prompt": [msgs], "completion": [msgs]}  conversational prompt-completion
    {"messages": [msgs]}                      conversational language modeling, last message the assistant's

A conversation may carry "template_kwargs" (the record's `tools`, `chat_template_kwargs`) for the template.

The loss (TRL's options, same names):
  - `completion_only_loss=True` (default): on the completion only; a `messages` record is read as the
    prompt (every message before the last) and the completion (the last assistant message), so only the
    final turn is learned;
  - `completion_only_loss=False`: on every token (TRL's language modeling);
  - `assistant_only_loss=True` (chat records): on every assistant turn; a turn is the text the template
    adds for that message after the generation prompt of the messages before it, so its end-of-turn token
    and whatever the template writes after it up to the next turn (`<|im_end|>\\n`) are learned with it.
    The template must render each conversation as a continuation of its beginnings (prefix-preserving).

A conversational prompt is rendered with the generation prompt, the completion is what the whole
conversation adds to it (`trl.apply_chat_template`, up to the longest common prefix of the two texts).
"""
from __future__ import annotations

from typing import Any

from data import _sft
from data._sources import DataError

Segments = list[tuple[str, bool]]


def render(template: str, messages: list, add_generation_prompt: bool, variables: dict) -> str:
  import jinja2  # pylint: disable=g-import-not-at-top
  from data._chat import apply_chat_template  # pylint: disable=g-import-not-at-top
  try:
    return apply_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.TemplateError as e:
    raise DataError("bad_messages", f"the chat template refused the conversation: {e}") from None


def assistant_turns(messages: list, template: str, variables: dict) -> Segments:
  """The rendered conversation cut into (text, is an assistant turn) pieces."""
  full = render(template, messages, False, variables)
  segments, pos = [], 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = render(template, messages[:i], True, variables)
    upto = render(template, messages[:i + 1], False, variables)
    if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
      raise DataError("bad_messages", f"the chat template does not render message {i} as a continuation of "
                      "the messages before it, so assistant turns cannot be told apart "
                      "(assistant_only_loss needs a prefix-preserving template)")
    segments += [(full[pos:len(before)], False), (full[len(before):len(upto)], True)]
    pos = len(upto)
  if pos < len(full):
    segments.append((full[pos:], False))
  return segments


def _check_messages(msgs: Any, name: str) -> list:
  if not isinstance(msgs, list) or not msgs:
    raise DataError("bad_messages", f"{name!r} must be a non-empty list of messages")
  for k, m in enumerate(msgs):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      raise DataError("bad_messages", f"{name}[{k}] is not a {{'role': str, 'content': str}}")
  return msgs


def sft_segments(record: dict, template: str | None, variables: dict, *, completion_only_loss: bool = True,
                 assistant_only_loss: bool = False) -> tuple[Segments, bool]:
  """(segments, chat) of a canonical record; `chat`: rendered with the template."""
  variables = {**variables, **record.get("template_kwargs", {})}
  if "text" in record:
    if assistant_only_loss:
      raise ValueError("assistant_only_loss needs conversational records (messages), not plain text")
    return [("", False), (record["text"], True)], False
  if "messages" not in record and isinstance(record.get("prompt"), str):
    if assistant_only_loss:
      raise ValueError("assistant_only_loss needs conversational records (messages), not plain text")
    p, c = record["prompt"], record["completion"]
    return ([(p, False), (c, True)] if completion_only_loss else [("", False), (p + c, True)]), False
  if not template:
    raise ValueError("the records are conversations but there is no chat template: set "
                     "config.chat_template or use a tokenizer that has one")
  if "messages" in record:
    msgs = _sft._messages(record, "messages")  # pylint: disable=protected-access
    if assistant_only_loss:
      segments = assistant_turns(msgs, template, variables)
    elif completion_only_loss:
      segments = list(zip(_sft.render_chat(msgs, template, variables), (False, True)))
    else:
      segments = [("", False), (render(template, msgs, False, variables), True)]
    return segments, True
  prompt = _check_messages(record["prompt"], "prompt")
  completion = _check_messages(record["completion"], "completion")
  if assistant_only_loss:
    if any(m["role"] != "assistant" for m in completion):
      raise DataError("bad_messages", "with assistant_only_loss the completion must be assistant messages")
    turns = assistant_turns(prompt + completion, template, variables)
    start = len(render(template, prompt, True, variables))
    # TRL: the completion mask and the assistant mask both apply; the prompt's turns are not learned.
    out, pos = [], 0
    for text, learned in turns:
      out.append((text, learned and pos >= start))
      pos += len(text)
    return out, True
  p = render(template, prompt, True, variables)
  full = render(template, prompt + completion, False, variables)
  cut = _sft.common_prefix_length(p, full)
  if not completion_only_loss:
    return [("", False), (full, True)], True
  return [(full[:cut], False), (full[cut:], True)], True


def stop_ids(tokenizer, chat_template: str | None = None) -> list[int]:
  """The ids generation stops at: eos, and the end-of-turn tokens with which the chat template closes an
  assistant turn (Gemma's `<end_of_turn>`, which is not its eos; ChatML's `<|im_end|>`). For
  `generation_config.json` and for decoding chat models."""
  ids = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
  template = chat_template or getattr(tokenizer, "chat_template", None)
  if not template:
    return ids
  specials = getattr(tokenizer, "special_tokens", None) or {}
  variables = {f"{k}_token": v for k, v in specials.items() if v is not None}
  msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
  try:
    turns = assistant_turns(msgs, template, variables)
  except DataError:
    return ids
  ends = set(getattr(tokenizer, "special_ids", ()) or ())
  for text, learned in turns:
    if learned:
      try:
        tokens = tokenizer.encode(text)
      except ValueError:
        continue
      ids += [int(t) for t in tokens if t in ends and int(t) not in ids]
  return ids
