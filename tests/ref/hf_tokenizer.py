"""Tokenizes and renders chat templates with transformers' `AutoTokenizer` (runs in .venv-ref).

    hf_tokenizer.py IN.npz OUT.npz

IN: `spec`, a JSON string:
  {"dir": tokenizer directory, "texts": [...],
   "chats": [{"messages": [...], "add_generation_prompt": bool, "template": optional Jinja source,
              "tools": optional list}],
   "save_to": optional directory to `save_pretrained` the tokenizer into (transformers 5's layout),
   "sp_dir": optional directory holding a SentencePiece tokenizer.model, for `LlamaTokenizer`}
OUT: `result`, a JSON string with the special-token ids, `len(tokenizer)`, per text the ids with and
without special tokens and the decodes of the former (skipping special tokens or not), per chat the
rendered text and its ids (or "ERROR: message" when the template raises), and for sp_dir the same ids.
"""
import json

import jinja2
import numpy as np
import transformers

from _common import parse_args, save


def texts_result(tok, texts):
  out = []
  for t in texts:
    with_special = tok.encode(t)
    out.append({"plain": tok.encode(t, add_special_tokens=False), "default": with_special,
                "decode_skip": tok.decode(with_special, skip_special_tokens=True),
                "decode_keep": tok.decode(with_special, skip_special_tokens=False)})
  return out


def main():
  arrays, out, _ = parse_args()
  spec = json.loads(str(arrays["spec"]))
  tok = transformers.AutoTokenizer.from_pretrained(spec["dir"])
  result = {"class": type(tok).__name__, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id, "len": len(tok), "texts": texts_result(tok, spec["texts"])}
  chats = []
  for chat in spec["chats"]:
    kw = {"add_generation_prompt": chat["add_generation_prompt"]}
    if chat.get("template"):
      kw["chat_template"] = chat["template"]
    if chat.get("tools"):
      kw["tools"] = chat["tools"]
    try:
      text = tok.apply_chat_template(chat["messages"], tokenize=False, **kw)
      ids = tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=False, **kw)
      chats.append({"text": text, "ids": list(np.asarray(ids).reshape(-1).tolist())})
    except jinja2.TemplateError as e:
      chats.append({"text": f"ERROR: {e}", "ids": []})
  result["chats"] = chats
  if spec.get("save_to"):
    tok.save_pretrained(spec["save_to"])
  if spec.get("sp_dir"):
    sp = transformers.LlamaTokenizer.from_pretrained(spec["sp_dir"])
    result["sp"] = {"class": type(sp).__name__, "bos_id": sp.bos_token_id, "eos_id": sp.eos_token_id,
                    "len": len(sp), "texts": texts_result(sp, spec["texts_sp"])}
  save(out, result=np.array(json.dumps(result)))


if __name__ == "__main__":
  main()
