"""Data: sources, SFT examples, packing, resumable batches, and built-in tasks with exact answers.

    cfg = data.default_config()                     # every option, commented; config.data overrides it
    tok = data.get_tokenizer(cfg)                   # CharTokenizer for builtin tasks, else load_tokenizer
    ds = data.get_dataset(cfg, "train", tokenizer=tok, batch_size=32, seq_len=128, seed=0)
    it = iter(ds)                                   # endless, shuffled per epoch (one pass for eval)
    batch = next(it)                                # inputs, targets, loss_mask, positions, segment_ids
    state = it.get_state(); it.set_state(state)     # small JSON dict for the checkpoint
    print(ds.report.summary())                      # records skipped per reason (skip_invalid=True)
    pairs, check = data.eval_examples(cfg, "test", n=200)   # [(prompt, answer)], check(prompt, response)

Preference data (`cfg.pref_kind = "pairwise" | "unpaired" | "listwise"`): the same `get_dataset` gives
[B, K, T] batches (one padded row per sequence; `scores`, `list_mask`, `label`, `ref_logps`,
precomputed embeddings `e_x`, `e_c`, `e_r`, `example_mask` beside them) with the same iterator; `preference_eval_examples(cfg, "test", n)` gives
validated `PreferenceRecord`s and `preference_batch` their batch. The built-in tasks have preference
versions with graded wrong answers (`generate_preference`).

Batches are dicts of numpy arrays `[B, T]`: `inputs`, `targets` (next token of the same document),
`loss_mask` (1 on response tokens and eos), `positions` (restart per document), `segment_ids` (1, 2...
per document, 0 = padding). Each example is `bos + prompt + response + eos`, bos and the end as the
checkpoint's tokenizer and chat template make them (`data._sft`); at generation time encode the prompt
with `data.encode_prompt(tokenizer, prompt)` (bos exactly when training has it) and decode until one of
`data.stop_ids(tokenizer)` (eos and the chat template's end-of-turn tokens).

Formats (`cfg.format`, detected from the fields by default): the project's own fields, TRL's standard and
conversational types, OpenAI messages, Alpaca, ShareGPT, HH-RLHF, UltraFeedback (binarized and rated
lists); `data/FORMATS.md` shows a record of each. SFT loss: `completion_only_loss`, `assistant_only_loss`.

Sources (`config.source`): builtin (sort, reverse, add), jsonl, parquet, tfds (array_record through
`tfds.data_source`), array_record (JSON records), hf (`datasets`: hub names, local files, `save_to_disk`
directories). File paths may be globs and hold "{split}". `prepare_synthetic` materialises a built-in
task as a TFDS dataset.

Built-in tasks (digit strings with exact answers) are the `synthetic` package.

Modules: `_sources` record sources, `_formats` dataset formats ->
canonical records, `_turns` which text carries the loss, `_sft` text -> tokens and validation, `_packing`
rows, `_pipeline` iterator, `_config` the config and sources, `_dataset` entry points,
`_preference` preference records -> [B, K, T] batches, `_pref_packing` their padding-free rows (`pref_packing`);
`_tokenizers` and `_chat` hold the HF / SentencePiece tokenizers and chat templates (imported lazily).
"""
from data._config import PREF_KINDS, SOURCES, default_config, get_tokenizer, make_source, split_files
from data._dataset import eval_examples, get_dataset, preference_generation_examples
from data._formats import FORMATS, extract_prompt
from data._packing import FIELDS, MODES, pack
from data._pipeline import BatchIterator, SFTDataset
from synthetic import (TASKS, CharTokenizer, Task, corrupt, generate, generate_preference, get_task, is_held_out,
                       wrong_digits)
from data._preference import (LIST_TO_PAIRS, PREF_REASONS, PreferenceDataset, PreferenceExample, PreferenceRecord,
                              num_sequences,
                              PreferenceReport, encode_preference, get_preference_dataset, layout,
                              preference_batch, preference_eval_examples, record_preference)
from data._sft import (REASONS, Example, SkipReport, adds_bos, build_examples, encode_prompt, encode_segments,
                       encode_sft, record_text)
from data._sources import (ArrayRecordSource, ConcatSource, DataError, HFSource, JsonlSource, ListSource,
                           ParquetSource, TfdsSource, write_array_record, write_jsonl)
from data._turns import stop_ids

# Imported on first use: the tokenizer modules pull in their own libraries.
_LAZY = {
    "load_tokenizer": "data._tokenizers",
    "Tokenizer": "data._tokenizers",
    "HFTokenizer": "data._tokenizers",
    "SentencePieceTokenizer": "data._tokenizers",
    "apply_chat_template": "data._chat",
    "load_chat_template": "data._chat",
}


def __getattr__(name):
  if name in ("prepare_synthetic", "SyntheticTasks", "SyntheticTasksConfig"):   # TFDS, on first use
    import synthetic  # pylint: disable=g-import-not-at-top
    return getattr(synthetic, name)
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'data' has no attribute {name!r}")
