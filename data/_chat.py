"""Chat templates: render a checkpoint's Jinja `chat_template` the way transformers does.

    template = load_chat_template("path/to/checkpoint")        # tokenizer_config.json or chat_template.jinja
    text = apply_chat_template(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

The environment matches transformers' `apply_chat_template`: a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape
HTML and accepts `indent` / `separators` / `sort_keys`, and the globals `raise_exception(msg)` and
`strftime_now(fmt)`. `{% generation %}...{% endgeneration %}` blocks (which mark assistant tokens for
transformers' `return_assistant_tokens_mask`) render their body. The template sees `messages`,
`add_generation_prompt`, the special tokens given as keywords, `tools` and `documents` (None unless
given, as transformers passes them) and any other keyword (template switches such as `enable_thinking`);
a message's reasoning under any of its names is also given as `reasoning_content` and `thinking`.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox


class _Generation(jinja2.ext.Extension):
  """`{% generation %}body{% endgeneration %}` renders body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
  # Templates come with downloaded checkpoints: untrusted code, hence the sandbox.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  return env.from_string(template)


_REASONING = ("reasoning_content", "thinking", "reasoning")


def apply_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                        **special_tokens) -> str:
  """Renders a conversation.

  Args:
    template: the Jinja source (a checkpoint's `chat_template`).
    messages: [{"role": ..., "content": ...}, ...].
    add_generation_prompt: end with the header that opens the assistant's turn.
    **special_tokens: bos_token, eos_token, ... and any other variable the template reads.
  Raises:
    jinja2.TemplateError: what the template raises with `raise_exception` (e.g. roles out of order).
  """
  out = []
  for m in messages:
    m = dict(m)
    # transformers fills `reasoning_content` (and gpt-oss's `thinking`) from any of the names for it.
    reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    out.append(m)
  # transformers always defines `tools` and `documents` (None when not given).
  variables = {"tools": None, "documents": None, **special_tokens}
  return _compile(template).render(messages=out, add_generation_prompt=add_generation_prompt, **variables)


def load_chat_template(path: str, name: str = "default") -> Optional[str]:
  """The chat template of a checkpoint directory, or None.

  transformers 5 writes it to `chat_template.jinja`; earlier versions into `tokenizer_config.json`, as a
  string or as a list of {"name", "template"} (then `name` picks one, "default" by default).
  """
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(path, "tokenizer_config.json")
  if not os.path.exists(config):
    return None
  with open(config, encoding="utf-8") as f:
    template = json.load(f).get("chat_template")
  if isinstance(template, list):
    named = {t["name"]: t["template"] for t in template}
    if name not in named:
      raise ValueError(f"no chat template named {name!r} in {config}; it has {sorted(named)}")
    template = named[name]
  return template
