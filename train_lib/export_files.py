"""The files beside an exported checkpoint that make `AutoTokenizer`, `AutoModelForCausalLM` and `generate`
work on it: the tokenizer, the chat template and `generation_config.json`.

    write_tokenizer(data_config, tokenizer, out)   # copies the checkpoint's tokenizer files, or writes a
                                                   # tokenizer.json for the CharTokenizer of built-in tasks
    generation_config(tokenizer)                   # {bos_token_id, eos_token_id: [eos + chat stop ids], pad_token_id}

The CharTokenizer's tokenizer.json is a BPE model without merges over single characters (ids as ours:
<pad> 0, <bos> 1, <eos> 2, then the characters), no pre-tokenizer and a Fuse decoder, so a text encodes to
one id per character and decodes back unchanged; its post-processor puts <bos> in front as our training
does (`add_special_tokens=True`, transformers' default).
"""
from __future__ import annotations

import json
import os
import shutil

import data as data_lib

_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "added_tokens", "vocab", "merges")


def generation_config(tokenizer) -> dict:
  out = {}
  if tokenizer.bos_id is not None:
    out["bos_token_id"] = int(tokenizer.bos_id)
  stops = data_lib.stop_ids(tokenizer)
  if stops:
    out["eos_token_id"] = stops if len(stops) > 1 else stops[0]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  if pad is not None:
    out["pad_token_id"] = int(pad)
  return out


def char_tokenizer_json(tokenizer, path: str) -> None:
  """A `tokenizers` file with the ids of a `data.CharTokenizer` (see the module docstring)."""
  from tokenizers import Tokenizer, decoders, models, processors   # pylint: disable=g-import-not-at-top
  specials = [tokenizer.decode([i], skip_special=False) for i in range(tokenizer.vocab_size - len(tokenizer.chars))]
  vocab = {tok: i for i, tok in enumerate(specials)}
  vocab.update({c: i + len(specials) for i, c in enumerate(tokenizer.chars)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.add_special_tokens(specials)
  tok.decoder = decoders.Fuse()
  bos = specials[tokenizer.bos_id]
  tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                     special_tokens=[(bos, tokenizer.bos_id)])
  tok.save(path)


def write_tokenizer(data_config, tokenizer, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  tok_dir = data_config.get("tokenizer")
  if tok_dir and tok_dir != "char" and os.path.isdir(tok_dir):
    for name in os.listdir(tok_dir):
      if name.startswith(_TOKENIZER_PREFIXES) or name.endswith(".model"):
        shutil.copy(os.path.join(tok_dir, name), out)
  elif isinstance(tokenizer, data_lib.CharTokenizer):
    char_tokenizer_json(tokenizer, os.path.join(out, "tokenizer.json"))
    names = {k: tokenizer.decode([getattr(tokenizer, f"{k}_id")], skip_special=False) for k in ("pad", "bos", "eos")}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                 **{f"{k}_token": v for k, v in names.items()}}, f, indent=2)
  template = data_config.get("chat_template")   # a template the run set itself overrides the checkpoint's
  if template:
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(template)
