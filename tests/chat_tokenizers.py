"""Tiny tokenizer directories with the special tokens and chat templates of four checkpoint families, built
with the `tokenizers` library (no downloads): what tokenizer.json + tokenizer_config.json of

    llama3   byte-level BPE; <|begin_of_text|> added by the post-processor and by the template; turns end <|eot_id|>
    mistral  Metaspace BPE; <s> added by the post-processor and by the template; [INST] ... [/INST]answer</s>
    qwen2    byte-level BPE, ChatML; no BOS at all; turns end "<|im_end|>\\n"; a default system message
    gemma    Metaspace BPE; <bos> added by the post-processor and the template; turns end "<end_of_turn>\\n",
             eos (<eos>) is not the end-of-turn token; no system role

look like. `make(family, directory, corpus)` trains the vocabulary on `corpus` (plus the templates' text).
"""
from __future__ import annotations

import json
import os

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

FAMILIES = {
    "llama3": dict(kind="bytelevel", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, template=LLAMA3_TEMPLATE, post_bos=True),
    "mistral": dict(kind="metaspace", specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", pad=None, unk="<unk>", template=MISTRAL_TEMPLATE, post_bos=True),
    "qwen2": dict(kind="bytelevel", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN2_TEMPLATE, post_bos=False),
    "gemma": dict(kind="metaspace", specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", template=GEMMA_TEMPLATE, post_bos=True),
}


def make(family: str, directory: str, corpus: list[str], vocab_size: int = 400) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  spec = FAMILIES[family]
  os.makedirs(directory, exist_ok=True)
  texts = list(corpus) + [spec["template"], "system user assistant model You are a helpful assistant."]
  if spec["kind"] == "bytelevel":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  else:
    tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(set("".join(texts)) | {"\u2581"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=alphabet)
  tok.train_from_iterator(texts * 2, trainer)
  if spec["post_bos"]:
    bos = tok.token_to_id(spec["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B", special_tokens=[(spec["bos"], bos)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"], "eos_token": spec["eos"],
            "chat_template": spec["template"]}
  if spec["pad"]:
    config["pad_token"] = spec["pad"]
  if spec.get("unk"):
    config["unk_token"] = spec["unk"]
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return directory
