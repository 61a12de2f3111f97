"""Dataset formats (data/FORMATS.md) read from files, detected or named, and their malformed records located.

The tokenizer is the tiny Qwen2-style one of tests/chat_tokenizers.py (ChatML, no BOS token at all), so
every path here also runs with a tokenizer that has no BOS; the Llama 3 one checks BOS once.
"""
import json

import numpy as np
import pytest

import data
from data import _formats
from tests import chat_tokenizers

CORPUS = ["What color is the sky? The sky is blue. Name a fruit. Apple. Hello there! Hi."]
USER = {"role": "user", "content": "What color is the sky?"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  return chat_tokenizers.make("qwen2", str(tmp_path_factory.mktemp("qwen2")), CORPUS)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  return chat_tokenizers.make("llama3", str(tmp_path_factory.mktemp("llama3")), CORPUS)


def _cfg(tok_dir, path, **kw):
  return {"source": "jsonl", "path": str(path), "tokenizer": tok_dir, **kw}


def _examples(cfg, split="train"):
  tok = data.get_tokenizer(cfg)
  return tok, data.get_dataset(cfg, split, tokenizer=tok, batch_size=2, seq_len=256, train=False).examples


def _learned(tok, ex):
  return tok.decode(ex.tokens[ex.weights > 0], skip_special=False)


def _prompt(tok, ex):
  return tok.decode(ex.tokens[:int(np.argmax(ex.weights > 0))], skip_special=False)


# ------------------------------------------------------------------------------------------------
# One good record per format: (pref_kind, format, record).
# ------------------------------------------------------------------------------------------------

RECORDS = {
    "trl_prompt_completion": (None, "trl", {"prompt": "The sky is", "completion": " blue."}),
    "trl_conversational": (None, "trl", {"prompt": [USER], "completion": [{"role": "assistant", "content": "Blue."}]}),
    "trl_text": (None, "trl", {"text": "The sky is blue."}),
    "messages": (None, "messages", {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What color "}, {"type": "text", "text": "is the sky?"}]},
        {"role": "assistant", "content": "Blue."}]}),
    "alpaca": (None, "alpaca", {"instruction": "Name a fruit.", "input": "", "output": "Apple."}),
    "sharegpt": (None, "sharegpt", {"conversations": [{"from": "system", "value": "Be brief."},
                                                      {"from": "human", "value": "Hello there!"},
                                                      {"from": "gpt", "value": "Hi."}]}),
    "hh_rlhf_sft": (None, "hh_rlhf", {"chosen": "\n\nHuman: Hello there!\n\nAssistant: Hi.",
                                      "rejected": "\n\nHuman: Hello there!\n\nAssistant: Go away."}),
    "trl_pairwise": ("pairwise", "trl", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    "trl_pairwise_conversational": ("pairwise", "trl", {
        "prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}]}),
    "trl_implicit": ("pairwise", "trl", {"chosen": "The sky is blue.", "rejected": "The sky is green."}),
    "trl_implicit_conversational": ("pairwise", "trl", {
        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Green."}]}),
    "trl_unpaired": ("unpaired", "trl", {"prompt": "The sky is", "completion": " blue.", "label": True}),
    "hh_rlhf": ("pairwise", "hh_rlhf", {"chosen": "\n\nHuman: Hello there!\n\nAssistant: Hi.",
                                        "rejected": "\n\nHuman: Hello there!\n\nAssistant: Go away."}),
    "ultrafeedback_binarized": ("pairwise", "ultrafeedback_binarized", {
        "prompt": "What color is the sky?", "prompt_id": "0",
        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Green."}],
        "messages": [USER, {"role": "assistant", "content": "Blue."}], "score_chosen": 9.0, "score_rejected": 2.5}),
    "ultrafeedback_binarized_sft": (None, "ultrafeedback_binarized", {
        "prompt": "What color is the sky?", "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Green."}],
        "messages": [USER, {"role": "assistant", "content": "Blue."}], "score_chosen": 9.0, "score_rejected": 2.5}),
    "ultrafeedback": ("listwise", "ultrafeedback", {
        "source": "evol_instruct", "instruction": "What color is the sky?", "models": ["a", "b", "c"],
        "completions": [{"model": "a", "response": "Blue.", "overall_score": 8.5},
                        {"model": "b", "response": "Green.", "overall_score": 3.0},
                        {"model": "c", "response": "Red.", "annotations": {
                            "helpfulness": {"Rating": "2", "Rationale": "..."},
                            "honesty": {"Rating": "4", "Rationale": "..."}}}]}),
}

# What each record is learned as: (prompt text, learned text) of the first sequence.
IM = "<|im_start|>"
SYSTEM = f"{IM}system\nYou are a helpful assistant.<|im_end|>\n"
CHAT_PROMPT = f"{SYSTEM}{IM}user\nWhat color is the sky?<|im_end|>\n{IM}assistant\n"
WANT = {
    "trl_prompt_completion": ("The sky is", " blue.<|im_end|>"),
    "trl_conversational": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
    "trl_text": ("", "The sky is blue.<|im_end|>"),
    "messages": (f"{IM}system\nBe brief.<|im_end|>\n{IM}user\nWhat color is the sky?<|im_end|>\n{IM}assistant\n",
                 "Blue.<|im_end|>\n"),
    "alpaca": (_formats.ALPACA_PROMPT_NO_INPUT.format(instruction="Name a fruit."), "Apple.<|im_end|>"),
    "sharegpt": (f"{IM}system\nBe brief.<|im_end|>\n{IM}user\nHello there!<|im_end|>\n{IM}assistant\n",
                 "Hi.<|im_end|>\n"),
    "hh_rlhf_sft": (f"{SYSTEM}{IM}user\nHello there!<|im_end|>\n{IM}assistant\n", "Hi.<|im_end|>\n"),
    "trl_pairwise": ("The sky is", " blue.<|im_end|>"),
    "trl_pairwise_conversational": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
    "trl_implicit": ("The sky is", " blue.<|im_end|>"),
    "trl_implicit_conversational": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
    "trl_unpaired": ("The sky is", " blue.<|im_end|>"),
    "hh_rlhf": (f"{SYSTEM}{IM}user\nHello there!<|im_end|>\n{IM}assistant\n", "Hi.<|im_end|>\n"),
    "ultrafeedback_binarized": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
    "ultrafeedback_binarized_sft": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
    "ultrafeedback": (CHAT_PROMPT, "Blue.<|im_end|>\n"),
}


def _first_seq(ex):
  return ex.seqs[0] if hasattr(ex, "seqs") else ex


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_format_read_from_a_file_and_detected(qwen, tmp_path, capsys, name):
  kind, fmt, record = RECORDS[name]
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [record, record])
  tok, examples = _examples(_cfg(qwen, path, pref_kind=kind))
  assert f"read as format {fmt!r}" in capsys.readouterr().out          # detected, and said so
  assert len(examples) == 2 and tok.bos_id is None
  ex = _first_seq(examples[0])
  assert (_prompt(tok, ex), _learned(tok, ex)) == WANT[name]
  named = _examples(_cfg(qwen, path, pref_kind=kind, format=fmt))[1]   # the same, named
  assert all(np.array_equal(_first_seq(a).tokens, _first_seq(b).tokens) for a, b in zip(examples, named))


def test_pairs_and_lists_carry_their_labels(qwen, tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [RECORDS["ultrafeedback"][2]])
  tok, (ex,) = _examples(_cfg(qwen, path, pref_kind="listwise"))
  np.testing.assert_allclose(ex.scores, [8.5, 3.0, 3.0])   # the third: mean of its aspect ratings
  assert [_learned(tok, s) for s in ex.seqs] == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n", "Red.<|im_end|>\n"]
  data.write_jsonl(path, [RECORDS["hh_rlhf"][2]])
  tok, (ex,) = _examples(_cfg(qwen, path, pref_kind="pairwise"))
  assert [_learned(tok, s) for s in ex.seqs] == ["Hi.<|im_end|>\n", "Go away.<|im_end|>\n"]
  data.write_jsonl(path, [RECORDS["trl_unpaired"][2], {**RECORDS["trl_unpaired"][2], "label": False}])
  cfg = _cfg(qwen, path, pref_kind="unpaired")
  ds = data.get_dataset(cfg, "train", tokenizer=data.get_tokenizer(cfg), batch_size=2, seq_len=64, train=False)
  assert list(next(iter(ds))["label"]) == [True, False]


def test_alpaca_joins_input_as_alpaca_does(qwen, tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [{"instruction": "Name a fruit.", "input": "Hello there!", "output": "Apple."}])
  tok, (ex,) = _examples(_cfg(qwen, path))
  assert _prompt(tok, ex) == (
      "Below is an instruction that describes a task, paired with an input that provides further context. "
      "Write a response that appropriately completes the request.\n\n### Instruction:\nName a fruit.\n\n"
      "### Input:\nHello there!\n\n### Response:\n")


def test_hh_without_a_chat_template_stays_text(tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [{"chosen": "\n\nHuman: sort 21\n\nAssistant: 12",
                           "rejected": "\n\nHuman: sort 21\n\nAssistant: 21"}])
  cfg = {"source": "jsonl", "path": str(path), "pref_kind": "pairwise"}
  (rec,) = data.preference_eval_examples(cfg, "train")
  assert rec.prompt == "\n\nHuman: sort 21\n\nAssistant:" and rec.responses == (" 12", " 21") and not rec.chat


# ------------------------------------------------------------------------------------------------
# Malformed records: file, line and field.
# ------------------------------------------------------------------------------------------------

BAD = {   # name -> (bad record, reason, the field the message names)
    "trl_prompt_completion": ({"prompt": "x", "completion": 5}, "wrong_type", "'completion'"),
    "trl_conversational": ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]},
                           "bad_messages", "prompt[0]"),
    "trl_text": ({"text": 3}, "wrong_type", "'text'"),
    "messages": ({"messages": [USER, {"role": "assistant", "content": [{"type": "image_url"}]}]}, "bad_messages",
                 "messages[1].content[0]"),
    "alpaca": ({"instruction": "Name a fruit."}, "missing_field", "'output'"),
    "sharegpt": ({"conversations": [{"from": "robot", "value": "beep"}]}, "bad_messages", "conversations[0].from"),
    "hh_rlhf_sft": ({"chosen": "Human: hi\n\nAssistant: yo", "rejected": "x"}, "bad_messages", "'chosen'"),
    "ultrafeedback_binarized_sft": ({"chosen": [USER, {"role": "assistant"}]}, "bad_messages", "chosen[1]"),
    "trl_pairwise": ({"prompt": "p", "chosen": 5, "rejected": "r"}, "wrong_type", "'chosen'"),
    "trl_pairwise_conversational": ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "a"}],
                                     "rejected": [{"role": "assistant", "content": 1}]}, "bad_messages", "'rejected'"),
    "trl_implicit": ({"chosen": "The sky is blue.", "rejected": None}, "missing_field", "'rejected'"),
    "trl_implicit_conversational": ({"chosen": [USER, {"role": "assistant", "content": "a"}],
                                     "rejected": [{"role": "user"}]}, "bad_messages", "rejected[0]"),
    "trl_unpaired": ({"prompt": "p", "completion": "c", "label": "yes"}, "bad_label", "'label'"),
    "hh_rlhf": ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: bye\n\nAssistant: yo"},
                "bad_messages", "'rejected'"),
    "ultrafeedback_binarized": ({"prompt": "q", "chosen": "Blue.", "rejected": [USER], "score_chosen": 1.0},
                                "wrong_type", "'chosen'"),
    "ultrafeedback": ({"instruction": "q", "completions": [{"response": "a", "overall_score": "high"},
                                                           {"response": "b", "overall_score": 1}]},
                      "bad_score", "completions[0].overall_score"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_record_names_file_line_and_field(qwen, tmp_path, name):
  kind, fmt, good = RECORDS[name]
  bad, reason, field = BAD[name]
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")   # line 2 blank, line 3 bad
  for cfg in (_cfg(qwen, path, pref_kind=kind), _cfg(qwen, path, pref_kind=kind, format=fmt)):
    with pytest.raises(data.DataError) as e:
      _examples(cfg)
    assert (e.value.file, e.value.line, e.value.reason) == (str(path), 3, reason), str(e.value)
    assert field in str(e.value), str(e.value)


def test_format_must_fit_the_data(qwen, tmp_path):
  with pytest.raises(ValueError, match="unknown data format 'csv'"):
    data.get_dataset({"format": "csv"}, "train", tokenizer=data.CharTokenizer(), batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match="holds no pairwise data"):
    data.get_dataset({"format": "alpaca", "pref_kind": "pairwise"}, "train", tokenizer=data.CharTokenizer(),
                     batch_size=2, seq_len=16)


# ------------------------------------------------------------------------------------------------
# Tokenization that follows the checkpoint, beyond the TRL parity cases.
# ------------------------------------------------------------------------------------------------

MULTI = {"messages": [USER, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]}


def test_assistant_only_loss_learns_every_assistant_turn_and_its_end(qwen, tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [MULTI])
  tok, (last,) = _examples(_cfg(qwen, path))
  assert _learned(tok, last) == "Apple.<|im_end|>\n"                  # default: the final turn
  tok, (every,) = _examples(_cfg(qwen, path, assistant_only_loss=True))
  assert _learned(tok, every) == "Blue.<|im_end|>\nApple.<|im_end|>\n"
  assert np.array_equal(last.tokens, every.tokens)
  tok, (whole,) = _examples(_cfg(qwen, path, completion_only_loss=False))
  assert whole.weights[1:].all()
  with pytest.raises(ValueError, match="assistant_only_loss needs conversational"):
    data.write_jsonl(path, [RECORDS["trl_prompt_completion"][2]])
    _examples(_cfg(qwen, path, assistant_only_loss=True))


def test_bos_once_and_eval_prompts(llama3, qwen, tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [MULTI, RECORDS["trl_prompt_completion"][2]])
  tok, examples = _examples(_cfg(llama3, path, format="trl"))
  for ex in examples:   # the template's bos and the post-processor's: once
    assert ex.tokens[0] == tok.bos_id and list(ex.tokens).count(tok.bos_id) == 1
  pairs, check = data.eval_examples(_cfg(llama3, path, format="trl"), "train")
  assert pairs[0][1] == "Apple." and check(pairs[0][0], "Apple.")   # the content, not the rendered turn
  prompt_ids = data.encode_prompt(tok, pairs[0][0])
  assert prompt_ids[0] == tok.bos_id and prompt_ids.count(tok.bos_id) == 1
  assert not pairs[0][0].startswith("<|begin_of_text|>")
  q = data.load_tokenizer(qwen)
  q_pairs, _ = data.eval_examples(_cfg(qwen, path, format="trl"), "train")
  assert data.encode_prompt(q, q_pairs[1][0]) == q.encode("The sky is")   # no bos to add


def test_add_bos_token_false_is_honoured(llama3, tmp_path):
  import shutil
  d = tmp_path / "tok"
  shutil.copytree(llama3, d)
  config = json.loads((d / "tokenizer_config.json").read_text())
  (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [RECORDS["trl_prompt_completion"][2]])
  tok, (ex,) = _examples(_cfg(str(d), path))
  assert not data.adds_bos(tok) and tok.bos_id not in ex.tokens
  assert data.adds_bos(data.load_tokenizer(llama3))


# ------------------------------------------------------------------------------------------------
# Sources: globs, Parquet, array_record, TFDS, HF datasets.
# ------------------------------------------------------------------------------------------------

def test_split_globs_read_every_file_and_locate_errors(qwen, tmp_path):
  good = RECORDS["sharegpt"][2]
  data.write_jsonl(tmp_path / "train-00000.jsonl", [good, good])
  data.write_jsonl(tmp_path / "train-00001.jsonl", [good])
  data.write_jsonl(tmp_path / "test-00000.jsonl", [good])
  cfg = _cfg(qwen, tmp_path / "{split}-*.jsonl")
  assert len(_examples(cfg)[1]) == 3 and len(_examples(cfg, "test")[1]) == 1
  (tmp_path / "train-00001.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(BAD["sharegpt"][0]) + "\n")
  with pytest.raises(data.DataError) as e:
    _examples(cfg)
  assert (e.value.file, e.value.line) == (str(tmp_path / "train-00001.jsonl"), 2)
  with pytest.raises(FileNotFoundError, match="no file matches"):
    _examples(cfg, "validation")


def test_parquet_and_array_record_hold_formats(qwen, tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  uf = RECORDS["ultrafeedback_binarized"][2]
  pq.write_table(pa.Table.from_pylist([uf, uf]), tmp_path / "train.parquet")
  tok, examples = _examples(_cfg(qwen, tmp_path / "{split}.parquet", source="parquet", pref_kind="pairwise"))
  assert [_learned(tok, s) for s in examples[0].seqs] == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]
  data.write_array_record(tmp_path / "train.array_record", [RECORDS["alpaca"][2]] * 3)
  tok, examples = _examples(_cfg(qwen, tmp_path / "{split}.array_record", source="array_record"))
  assert len(examples) == 3 and _learned(tok, examples[0]) == "Apple.<|im_end|>"


def test_tfds_holds_a_format(qwen, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class ShareGptRecords(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):   # as data/_tfds.py: nothing to download, no checksums to look for
      return None

    def _info(self):
      turn = {"from": tfds.features.Text(), "value": tfds.features.Text()}
      features = tfds.features.FeaturesDict({"conversations": tfds.features.Sequence(turn)})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, RECORDS["sharegpt"][2]

  ShareGptRecords(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = {"source": "tfds", "name": "share_gpt_records", "data_dir": str(tmp_path), "tokenizer": qwen}
  tok, examples = _examples(cfg)
  assert len(examples) == 3 and _learned(tok, examples[0]) == "Hi.<|im_end|>\n"


def test_hf_datasets_local_files_and_save_to_disk(qwen, tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  rec = RECORDS["trl_pairwise_conversational"][2]
  data.write_jsonl(tmp_path / "train.jsonl", [rec, rec])
  cfg = _cfg(qwen, tmp_path / "{split}.jsonl", source="hf", name="json", pref_kind="pairwise")
  tok, examples = _examples(cfg)
  assert len(examples) == 2 and _learned(tok, examples[0].seqs[1]) == "Green.<|im_end|>\n"
  saved = tmp_path / "saved"
  chat = {"messages": [USER, {"role": "assistant", "content": "Blue."}]}
  datasets.DatasetDict({"train": datasets.Dataset.from_list([chat] * 2),
                        "test": datasets.Dataset.from_list([chat])}).save_to_disk(str(saved))
  cfg = {"source": "hf", "name": str(saved), "tokenizer": qwen}
  tok, examples = _examples(cfg)
  assert len(examples) == 2 and _learned(tok, examples[0]) == "Blue.<|im_end|>\n"
  assert len(_examples(cfg, "test")[1]) == 1
  local = tmp_path / "local"            # a directory of data files, as load_dataset reads it
  local.mkdir()
  data.write_jsonl(local / "train.jsonl", [RECORDS["sharegpt"][2]] * 3)
  tok, examples = _examples({"source": "hf", "name": str(local), "tokenizer": qwen})
  assert len(examples) == 3 and _learned(tok, examples[0]) == "Hi.<|im_end|>\n"
  bad = tmp_path / "bad"
  bad_rows = [RECORDS["alpaca"][2], {"instruction": "x", "input": "", "output": None}]
  datasets.Dataset.from_list(bad_rows).save_to_disk(str(bad))
  with pytest.raises(data.DataError) as e:
    _examples({"source": "hf", "name": str(bad), "tokenizer": qwen})
  assert e.value.line == 2 and "'output'" in str(e.value)


def test_preference_eval_pairs_are_contents_without_bos_text(llama3, tmp_path):
  path = tmp_path / "train.jsonl"
  data.write_jsonl(path, [RECORDS["ultrafeedback_binarized"][2]])
  cfg = _cfg(llama3, path, pref_kind="pairwise")
  (rec,) = data.preference_eval_examples(cfg, "train")
  assert rec.chat and rec.answers == ("Blue.", "Green.") and rec.prompt.startswith("<|begin_of_text|>")
  pairs, check = data.eval_examples(cfg, "train")
  assert pairs == [(rec.prompt[len("<|begin_of_text|>"):], "Blue.")] and check(*pairs[0])


def test_the_records_of_formats_md_read_as_their_section_says(qwen, tmp_path):
  import pathlib
  import re
  text = (pathlib.Path(data.__file__).parent / "FORMATS.md").read_text()
  checked = set()
  for section in re.split(r"\n## ", text)[1:]:
    name = section.split("\n", 1)[0].strip()
    for k, block in enumerate(re.findall(r"```json\n(.*?)\n```", section, re.S)):
      record = json.loads(block)
      kinds = [kind for kind in (None, "pairwise", "unpaired", "listwise")
               if _formats.detect(record, data._config.resolve({"pref_kind": kind})) == name]
      assert kinds, (name, record)
      path = tmp_path / f"{name}{k}.jsonl"
      data.write_jsonl(path, [record])
      read = []   # "fields" is also the fallback of every kind: some kind must read it
      for kind in kinds:
        try:
          read.append(len(_examples(_cfg(qwen, path, pref_kind=kind))[1]))
        except data.DataError:
          continue
      assert read and set(read) == {1}, (name, record)
      checked.add(name)
  assert checked == set(data.FORMATS) - {"auto"}


def test_extract_prompt_as_trl():
  assert data.extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
  assert data.extract_prompt("ab", "abc") == ("a", "b", "bc")     # TRL's loop ends on the last index
  assert data.extract_prompt("x ", "y") == ("", "x ", "y")
  q, a, b = [USER], {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
  assert data.extract_prompt(q + [a], q + [b]) == (q, [a], [b])


def test_sentencepiece_end_of_turn_is_special(tmp_path):
  """A SentencePiece model whose end-of-turn marker is a user-defined piece (Gemma's <end_of_turn>): the
  rendered turn ends itself, no eos is appended."""
  import io
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400,
                                 user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], hard_vocab_limit=False,
                                 byte_fallback=True, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  tok = data.load_tokenizer(str(tmp_path))
  end = tok._sp.piece_to_id("<end_of_turn>")
  assert end in tok.special_ids and tok.eos_id in tok.special_ids
  assert not any(tok._sp.is_byte(i) for i in tok.special_ids)
  segments = [("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", False),   # Gemma's layout
              ("Hello.<end_of_turn>\n", True)]
  ex = data.encode_segments(segments, tok, seq_len=128, chat=True)
  assert ex.tokens[0] == tok.bos_id and end in ex.tokens and ex.tokens[-1] != tok.eos_id
