"""Tokenizers and chat templates against transformers' AutoTokenizer / apply_chat_template.

A byte-level BPE `tokenizer.json` (Llama-3 style: BOS added by its post-processor) and a SentencePiece
model (Llama's settings: identity normalisation, dummy prefix, byte fallback) are trained inside the test
on a few sentences; tests/ref/hf_tokenizer.py runs transformers on the same files.
"""
import io
import json
import os

import jinja2
import numpy as np
import pytest

from data._chat import apply_chat_template, load_chat_template
from data._tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from tests import refenv

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
          "Tokenizers split text into pieces, and pieces into ids.", "héllo wörld, naïve café 😀",
          "def f(x):\n    return x * 2\n", "Temperatures in °C for <city> & 'region'."] * 3
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
TEXTS = ["Hello world . How are you?", "héllo  wörld 😀\n\tnew line", "The fox<|eot_id|>jumps",
         "isn't it ? unseen: zq§", ""]
# No leading whitespace: there transformers' converted Llama tokenizer and sentencepiece disagree.
TEXTS_SP = ["Hello world. How are you?  héllo  😀 x\ny", "digits 12345 and tabs\t!", "Zebra-xylophone ÆØÅ"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Block tags on their own indented lines: only right with trim_blocks and lstrip_blocks. Also tojson
# (HF's: no HTML escaping, indent), loop controls and raise_exception.
CHATML_TEMPLATE = """{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('Unknown role: ' + message['role']) }}
  {% endif %}
  {% if loop.index0 >= 3 %}{% break %}{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if tools is defined and tools %}
<tools>{{ tools | tojson }}</tools>
{{ tools[0] | tojson(indent=2) }}
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
TOOLS = [{"name": "weather", "description": "Temperature in °C for <city> & 'region'",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CONVERSATION = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hello world!"},
                {"role": "assistant", "content": "Hi, how are you?"}, {"role": "user", "content": "Fine."}]
CHATS = [
    dict(messages=CONVERSATION[1:2], add_generation_prompt=True),
    dict(messages=CONVERSATION, add_generation_prompt=False),
    dict(messages=CONVERSATION, add_generation_prompt=True, template=CHATML_TEMPLATE),
    dict(messages=CONVERSATION[:2], add_generation_prompt=True, template=CHATML_TEMPLATE, tools=TOOLS),
    dict(messages=[{"role": "robot", "content": "beep"}], add_generation_prompt=False, template=CHATML_TEMPLATE),
]


def render(tok, chat):
  template = chat.get("template") or tok.chat_template
  kw = {"tools": chat["tools"]} if chat.get("tools") else {}
  return apply_chat_template(template, chat["messages"], chat["add_generation_prompt"],
                             bos_token=tok.special_tokens["bos"], eos_token=tok.special_tokens["eos"], **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers
  d = tmp_path_factory.mktemp("bpe")
  tok = RawTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  tok.save(str(d / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_header_id|>",
            # transformers 4 wrote AddedToken dicts; the cleanup flag must be ignored for BPE.
            "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False,
                          "normalized": False, "rstrip": False, "single_word": False, "special": True},
            "clean_up_tokenization_spaces": True, "chat_template": LLAMA3_TEMPLATE}
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>", "eos_token": "<|eot_id|>"}))
  return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("sp")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=360, model_type="bpe", byte_fallback=True,
      hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
  (d / "tokenizer.model").write_bytes(model.getvalue())
  return d


@pytest.fixture(scope="module")
def ref(hf_dir, sp_dir, tmp_path_factory):
  refenv.require()
  saved = tmp_path_factory.mktemp("saved_by_transformers")
  spec = dict(dir=str(hf_dir), texts=TEXTS, chats=CHATS, save_to=str(saved), sp_dir=str(sp_dir), texts_sp=TEXTS_SP)
  out = refenv.run("hf_tokenizer", {"spec": np.array(json.dumps(spec))})
  return json.loads(str(out["result"])), saved


# ---------------------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_special_tokens_and_vocab_match(hf_dir, ref):
  r, _ = ref
  tok = load_tokenizer(str(hf_dir))
  assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
  # special_tokens_map.json overrides eos of a tokenizer_config.json without added_tokens_decoder.
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (r["bos_id"], r["eos_id"], r["pad_id"], r["len"])
  assert tok.eos_id == tok.token_to_id("<|eot_id|>")


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_encode_decode_match(hf_dir, ref, i):
  r, _ = ref
  tok, want = load_tokenizer(str(hf_dir)), r["texts"][i]
  assert tok.encode(TEXTS[i]) == want["plain"]
  assert tok.encode(TEXTS[i], add_bos=True) == want["default"]          # the post-processor's BOS
  assert tok.encode(TEXTS[i], add_bos=True, add_eos=True) == want["default"] + [tok.eos_id]
  assert tok.decode(want["default"]) == want["decode_skip"]
  assert tok.decode(want["default"], skip_special=False) == want["decode_keep"]


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CHATS)))
def test_chat_template_matches(hf_dir, ref, i):
  r, _ = ref
  tok, want = load_tokenizer(str(hf_dir)), r["chats"][i]
  if want["text"].startswith("ERROR: "):
    with pytest.raises(jinja2.TemplateError) as e:
      render(tok, CHATS[i])
    assert f"ERROR: {e.value}" == want["text"]
    return
  text = render(tok, CHATS[i])
  assert text == want["text"]
  assert tok.encode(text) == want["ids"]    # transformers tokenizes the rendering without adding BOS
  if not CHATS[i].get("template"):
    assert tok.apply_chat_template(CHATS[i]["messages"], CHATS[i]["add_generation_prompt"]) == want["text"]


@pytest.mark.parity
def test_reads_what_transformers_5_saves(ref):
  """transformers 5 moves the template to chat_template.jinja and rewrites tokenizer_config.json."""
  r, saved = ref
  tok = load_tokenizer(str(saved))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (r["bos_id"], r["eos_id"], r["pad_id"])
  assert render(tok, CHATS[1]) == r["chats"][1]["text"]
  assert tok.encode(TEXTS[0], add_bos=True) == r["texts"][0]["default"]


# ---------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(TEXTS_SP)))
def test_sentencepiece_matches_llama_tokenizer(sp_dir, ref, i):
  r, _ = ref
  tok, want = load_tokenizer(str(sp_dir)), r["sp"]["texts"][i]
  assert isinstance(tok, SentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (r["sp"]["bos_id"], r["sp"]["eos_id"], r["sp"]["len"])
  assert tok.encode(TEXTS_SP[i]) == want["plain"]
  assert tok.decode(tok.encode(TEXTS_SP[i], add_bos=True, add_eos=True)) == want["decode_skip"] == TEXTS_SP[i]


def test_sentencepiece_matches_sentencepiece(sp_dir):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
  tok = load_tokenizer(str(sp_dir / "tokenizer.model"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), None, sp.get_piece_size())
  for text in TEXTS_SP + TEXTS:
    ids = sp.encode(text)
    assert tok.encode(text, add_bos=True, add_eos=True) == [sp.bos_id()] + ids + [sp.eos_id()]
    assert tok.decode([sp.bos_id()] + ids + [sp.eos_id()]) == sp.decode(ids)
    assert tok.decode([sp.bos_id()] + ids + [sp.eos_id()], skip_special=False) == "<s>" + sp.decode(ids) + "</s>"
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------
# Loading and templates without the reference
# ---------------------------------------------------------------------------------------------------
def test_load_tokenizer_picks_by_content(hf_dir, sp_dir, tmp_path):
  assert isinstance(load_tokenizer(str(hf_dir)), HFTokenizer)
  assert isinstance(load_tokenizer(str(hf_dir / "tokenizer.json")), HFTokenizer)
  assert isinstance(load_tokenizer(str(sp_dir)), SentencePieceTokenizer)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_tokenizer(str(tmp_path))


def test_add_eos_without_eos_fails(sp_dir, tmp_path):
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=80,
                                 hard_vocab_limit=False, eos_id=-1, minloglevel=2)
  (tmp_path / "x.model").write_bytes(model.getvalue())
  tok = load_tokenizer(str(tmp_path))
  assert tok.eos_id is None
  with pytest.raises(ValueError, match="no eos token"):
    tok.encode("hello", add_eos=True)


def test_load_chat_template_variants(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]}))
  assert load_chat_template(str(tmp_path)) == "A"
  assert load_chat_template(str(tmp_path), "tool_use") == "B"
  with pytest.raises(ValueError, match="rag"):
    load_chat_template(str(tmp_path), "rag")
  (tmp_path / "chat_template.jinja").write_text("C")
  assert load_chat_template(str(tmp_path)) == "C"
  assert load_chat_template(str(tmp_path / "missing")) is None


def test_template_environment():
  """The rules transformers' environment adds to plain Jinja, each on a template of its own."""
  msgs = [{"role": "user", "content": "x"}]
  # trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
  assert apply_chat_template("  {% for m in messages %}\n{{ m.content }}\n  {% endfor %}\n", msgs) == "x\n"
  # tojson keeps non-ASCII and HTML characters as they are.
  assert apply_chat_template("{{ messages | tojson }}", [{"c": "<é>&'"}]) == '[{"c": "<é>&\'"}]'
  assert apply_chat_template("{% for m in messages %}{{ m.c }}{% if m.c == 2 %}{% break %}{% endif %}"
                             "{% endfor %}", [{"c": 1}, {"c": 2}, {"c": 3}]) == "12"
  assert apply_chat_template("{% generation %}{{ messages[0].content }}{% endgeneration %}", msgs) == "x"
  with pytest.raises(jinja2.TemplateError, match="no system"):
    apply_chat_template("{{ raise_exception('no system') }}", msgs)
  with pytest.raises(jinja2.exceptions.SecurityError):   # sandboxed: templates are downloaded code
    apply_chat_template("{{ messages.__class__.__mro__ }}", msgs)
