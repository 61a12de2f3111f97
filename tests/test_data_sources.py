"""Record sources (JSONL, Parquet, array_record, TFDS, HF), chat records, and validation with locations."""
import glob
import json

import pytest

import data

TOK = data.CharTokenizer()
GOOD = {"prompt": "sort:321=", "response": "123"}


def _cfg(**kw):
  cfg = data.default_config()
  cfg.update({"tokenizer": "char", **kw})
  return cfg


def _one_pass_docs(cfg, split="train", seq_len=32):
  """Every document of one ordered pass, as the token tuples the model sees."""
  ds = data.get_dataset(cfg, split, tokenizer=TOK, batch_size=4, seq_len=seq_len, train=False)
  docs = []
  for b in ds:
    for r in range(b["inputs"].shape[0]):
      for s in range(1, b["segment_ids"][r].max() + 1):
        docs.append(tuple(b["inputs"][r][b["segment_ids"][r] == s]))
  return ds, docs


def _want(records, prompt="prompt", response="response"):
  return sorted(tuple(TOK.encode(r[prompt] + r[response], add_bos=True, add_eos=True)) for r in records)


# ------------------------------------------------------------------------------------------------
# Round trips.
# ------------------------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
  train = data.generate("reverse", "train", 37, seed=0)
  test = data.generate("reverse", "test", 11, seed=0)
  data.write_jsonl(tmp_path / "train.jsonl", train)
  data.write_jsonl(tmp_path / "test.jsonl", test)
  cfg = _cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl"))
  ds, docs = _one_pass_docs(cfg)
  assert len(ds) == 37 and sorted(docs) == _want(train)
  assert sorted(_one_pass_docs(cfg, "test")[1]) == _want(test)
  pairs, check = data.eval_examples(cfg, "test", 5)
  assert pairs == [(r["prompt"], r["response"]) for r in test[:5]]
  assert all(check(p, a) for p, a in pairs) and not check(pairs[0][0], pairs[0][1] + "0")


def test_path_without_split_placeholder_only_names_train(tmp_path):
  data.write_jsonl(tmp_path / "all.jsonl", [GOOD])
  cfg = _cfg(source="jsonl", path=str(tmp_path / "all.jsonl"))
  assert len(data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=16)) == 1
  with pytest.raises(ValueError, match="placeholder"):
    data.get_dataset(cfg, "test", tokenizer=TOK, batch_size=2, seq_len=16)


def test_parquet_round_trip_with_custom_fields(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  records = data.generate("add", "train", 29, seed=1)
  rows = [{"question": r["prompt"], "answer": r["response"], "id": i} for i, r in enumerate(records)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
  cfg = _cfg(source="parquet", path=str(tmp_path / "{split}.parquet"), prompt_field="question",
             response_field="answer")
  ds, docs = _one_pass_docs(cfg)
  assert len(ds) == 29 and sorted(docs) == _want(records)


def test_array_record_round_trip(tmp_path):
  records = data.generate("sort", "train", 23, seed=2)
  data.write_array_record(tmp_path / "train-00000.array_record", records[:10])
  data.write_array_record(tmp_path / "train-00001.array_record", records[10:])
  src = data.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  assert len(src) == 23 and [src[i] for i in range(23)] == records   # random access, file order
  cfg = _cfg(source="array_record", path=str(tmp_path / "{split}-*.array_record"))
  ds, docs = _one_pass_docs(cfg)
  assert sorted(docs) == _want(records)


def test_tfds_builder_writes_array_record_read_without_tensorflow(tmp_path):
  builder = data.prepare_synthetic("add", str(tmp_path), train_size=40, test_size=12)
  name = f"synthetic_tasks/{builder.builder_config.name}"
  assert glob.glob(str(tmp_path / "synthetic_tasks" / "*" / "*" / "*.array_record*"))
  cfg = _cfg(source="tfds", name=name, data_dir=str(tmp_path))
  src = data.make_source(cfg, "train")
  got = sorted(json.dumps(src[i], sort_keys=True) for i in range(len(src)))
  assert got == sorted(json.dumps(r, sort_keys=True) for r in data.generate("add", "train", 40))
  ds, docs = _one_pass_docs(cfg, "test")
  assert sorted(docs) == _want(data.generate("add", "test", 12))
  pairs, check = data.eval_examples(cfg, "test")
  assert len(pairs) == 12 and all(check(p, a) and data.get_task("add").check(p, a) for p, a in pairs)


def test_train_size_takes_a_seeded_subset(tmp_path):
  records = data.generate("sort", "train", 50, seed=0)
  data.write_jsonl(tmp_path / "train.jsonl", records)
  cfg = _cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl"), train_size=20)
  a, b = _one_pass_docs(cfg)[1], _one_pass_docs(cfg)[1]
  c = _one_pass_docs(_cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl"), train_size=20, data_seed=1))[1]
  assert len(a) == 20 and a == b and sorted(a) != sorted(c)
  assert set(a) <= set(_want(records))


def test_hf_source_is_guarded():
  try:
    import datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="datasets"):
      data.HFSource("anything", "train")
  else:
    pytest.skip("HF datasets is installed")


# ------------------------------------------------------------------------------------------------
# Chat records.
# ------------------------------------------------------------------------------------------------

# Only characters CharTokenizer knows, so the records also go through get_dataset.
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 321"},
                     {"role": "assistant", "content": "123"}]}


def test_chat_record_splits_prompt_and_last_turn():
  pytest.importorskip("data._chat")
  prompt, response = data.record_text(CHAT, messages_field="messages", chat_template=TEMPLATE)
  assert prompt == "system: be brief\nuser: sort 321\nassistant: "
  assert response == "123\n"
  # A trailing eos token in the rendering is cut: the eos id is appended instead.
  eos_template = TEMPLATE.replace("}}\n{% endfor", "}}{{ eos_token }}{% endfor")
  _, response = data.record_text(CHAT, messages_field="messages", chat_template=eos_template,
                                 special_tokens={"eos_token": "</s>"})
  assert response == "123"


def test_chat_records_through_get_dataset(tmp_path):
  pytest.importorskip("data._chat")
  data.write_jsonl(tmp_path / "train.jsonl", [CHAT])
  cfg = _cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl"), messages_field="messages",
             chat_template=TEMPLATE)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=1, seq_len=64, train=False)
  b = next(iter(ds))
  assert TOK.decode(b["inputs"][0]) == "system: be brief\nuser: sort 321\nassistant: 123\n"
  assert TOK.decode(b["targets"][0][b["loss_mask"][0] > 0], skip_special=False) == "123\n<eos>"


# ------------------------------------------------------------------------------------------------
# Validation: every malformed kind names the file, the line and the reason.
# ------------------------------------------------------------------------------------------------

BAD = {
    "bad_json": ('{"prompt": "a", "response": ', {}),
    "wrong_type": ('{"prompt": "a", "response": 5}', {}),
    "missing_field": ('{"prompt": "a"}', {}),
    "empty_response": ('{"prompt": "a", "response": ""}', {}),
    "unencodable": ('{"prompt": "SORT", "response": "b"}', {}),
    "too_long": (json.dumps({"prompt": "a", "response": "b" * 40}), {"truncate": False}),
    "empty_after_truncation": (json.dumps({"prompt": "a" * 40, "response": "b"}), {}),
}


def _file(tmp_path, bad_line):
  # Line 1 good, line 2 blank (still counted), line 3 bad, line 4 good.
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
  return path


@pytest.mark.parametrize("reason", sorted(BAD))
def test_malformed_record_raises_with_file_line_and_reason(tmp_path, reason):
  line, overrides = BAD[reason]
  path = _file(tmp_path, line)
  cfg = _cfg(source="jsonl", path=str(path), **overrides)
  with pytest.raises(data.DataError) as e:
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=32)
  assert (e.value.file, e.value.line, e.value.reason) == (str(path), 3, reason)
  assert str(e.value).startswith(f"{path}, line 3: {reason}")


def test_non_object_json_and_bad_chat_are_located(tmp_path):
  path = _file(tmp_path, "[1, 2]")
  with pytest.raises(data.DataError, match=r"line 3: wrong_type: a record must be a JSON object"):
    data.get_dataset(_cfg(source="jsonl", path=str(path)), "train", tokenizer=TOK, batch_size=2, seq_len=32)
  pytest.importorskip("data._chat")
  path.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": CHAT["messages"][:2]}) + "\n")
  cfg = _cfg(source="jsonl", path=str(path), messages_field="messages", chat_template=TEMPLATE)
  with pytest.raises(data.DataError, match=r"line 2: bad_messages: the last message is from 'user'"):
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=64)
  refusing = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(data.DataError, match=r"line 1: bad_messages: .*roles must alternate"):
    data.get_dataset(_cfg(source="jsonl", path=str(path), messages_field="messages", chat_template=refusing),
                     "train", tokenizer=TOK, batch_size=2, seq_len=64)


def test_parquet_errors_name_the_row(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "train.parquet"
  pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "sort:1=", "response": None}]), path)
  with pytest.raises(data.DataError) as e:
    data.get_dataset(_cfg(source="parquet", path=str(path)), "train", tokenizer=TOK, batch_size=2, seq_len=32)
  assert (e.value.file, e.value.line, e.value.reason) == (str(path), 2, "missing_field")


def test_skip_invalid_counts_every_reason(tmp_path):
  lines = [json.dumps(GOOD)]
  for reason in sorted(BAD):
    if reason != "too_long":      # too_long needs truncate=False, which would change the others
      lines += [BAD[reason][0], BAD[reason][0]] if reason == "bad_json" else [BAD[reason][0]]
  lines.append(json.dumps({"prompt": "sort:4=", "response": "4"}))
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg = _cfg(source="jsonl", path=str(path), skip_invalid=True)
  ds = data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=32, train=False)
  assert len(ds) == 2
  want = {r: 1 for r in BAD if r != "too_long"}
  want["bad_json"] = 2
  assert dict(ds.report.counts) == want and ds.report.total == len(lines) and ds.report.skipped == 7
  summary = ds.report.summary()
  assert summary.startswith(f"7 of {len(lines)} records skipped")
  assert f"bad_json=2 (first: {path}, line 2: bad_json" in summary
  _, docs = _one_pass_docs(cfg)
  assert sorted(docs) == _want([GOOD, {"prompt": "sort:4=", "response": "4"}])
  # Every record invalid: an empty dataset is an error that carries the report, not an empty loop.
  path.write_text(BAD["missing_field"][0] + "\n")
  with pytest.raises(ValueError, match="no examples.*missing_field=1"):
    data.get_dataset(cfg, "train", tokenizer=TOK, batch_size=2, seq_len=32)


def test_chat_records_with_a_checkpoint_tokenizer(tmp_path):
  """A tokenizer directory (tokenizer.json + tokenizer_config.json with a chat template that ends turns
  with eos): the learned targets are the reply and exactly one eos id."""
  tokenizers = pytest.importorskip("tokenizers")
  pytest.importorskip("data._tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tok.train_from_iterator(["user : sort 321 assistant : 123", "system : be brief"], trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  template = ("{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }} {{ eos_token }}"
              "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": template}))
  data.write_jsonl(tmp_path / "train.jsonl", [CHAT])
  cfg = _cfg(source="jsonl", path=str(tmp_path / "{split}.jsonl"), messages_field="messages",
             tokenizer=str(tmp_path))
  tk = data.get_tokenizer(cfg)
  batch = next(iter(data.get_dataset(cfg, "train", tokenizer=tk, batch_size=1, seq_len=32, train=False)))
  learned = batch["targets"][0][batch["loss_mask"][0] > 0]
  assert list(learned) == tk.encode("123", add_eos=True)
  inputs = batch["inputs"][0][batch["segment_ids"][0] > 0]
  assert list(inputs).count(tk.bos_id) == 1 and inputs[0] == tk.bos_id
  assert tk.decode(inputs) == tk.decode(tk.encode("system : be brief user : sort 321 assistant : 123"))
