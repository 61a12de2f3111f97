"""The `precompute` task: a model's log-probs of every record's completions, written into the records.

    python main.py --config=configs/precompute.py --config.reference=/tmp/sft \\
      --config.data.source=jsonl --config.data.path='data/{split}.jsonl' --config.data.pref_kind=pairwise \\
      --config.data.tokenizer=DIR --workdir=/tmp/pairs_ref
    # -> /tmp/pairs_ref/{train,test}.jsonl, each record with "ref_logps": [log π_ref(chosen), log π_ref(rejected)]

Each kept record of each split (`splits`) is read, checked and tokenized exactly as a training run with
the same `data` options and `seq_len` reads it (`data.get_dataset`), the model `reference` (a project
workdir or a Hugging Face checkpoint directory) scores its sequences, and the record is written back,
unchanged but for one field holding the summed completion log-probs:

  preference records (`data.pref_kind` pairwise | unpaired): `field` (default "ref_logps") = one number
      per sequence in batch order (chosen, rejected); train with `--config.data.ref_logps_field=ref_logps`
      and the trainer uses them as the reference (`train_lib.train.loss_and_metrics`), with no reference
      model in memory;
  SFT records: `field` (default "aligned_logps") = a list; with `append=True` this model's number is added
      to the list already in the record, so M aligned models are M runs of this task, each reading the
      previous one's output. PoFT trains from them with `--config.data.aligned_logps_field=aligned_logps
      --config.data.packing=none`.

Records the data options reject (with `skip_invalid`) are left out of the output. The numbers hold for the
tokenizer, template, truncation and `seq_len` they were made with: train with the same options.
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import data as data_lib
import losses
import models
from train_lib import build
from train_lib import evaluate as eval_lib

PREF_FIELD, SFT_FIELD = "ref_logps", "aligned_logps"


def load_model(path: str):
  """(model, params) of a project workdir (its latest checkpoint) or a Hugging Face checkpoint directory."""
  if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, build.CONFIG_FILE)):
    _, model, params, _ = build.load_trained(path)
    return model, params
  if os.path.exists(os.path.join(path, "config.json")):
    cfg, params = models.load_hf(path)
    return models.Decoder(cfg), jax.tree.map(jnp.asarray, params)
  raise FileNotFoundError(f"{path!r} is neither a project workdir (config.json and checkpoints/) nor a "
                          f"Hugging Face checkpoint (config.json and weights)")


def _logps(model, params, batch):
  return losses.model_outputs(model, params, batch)["logps"]


_logps_jit = jax.jit(_logps, static_argnums=0)


def sequence_logps(model, params, batch: dict, batch_size: int) -> np.ndarray:
  """[N, K] summed completion log-probs of a [N, K, T] (or packed-one-per-row [N, T]) host batch, in
  slices of `batch_size` rows (the last padded with copies of its first row, then cut)."""
  batch = eval_lib.to_model_batch({k: batch[k] for k in data_lib.FIELDS})
  out = []
  for s in range(0, len(batch["inputs"]), batch_size):
    part = {k: v[s:s + batch_size] for k, v in batch.items()}
    n = len(part["inputs"])
    if n < batch_size:
      part = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]) for k, v in part.items()}
    lp = _logps_jit(model, params, {k: jnp.asarray(v) for k, v in part.items()})
    out.append(np.asarray(jax.device_get(lp), np.float64)[:n])
  return np.concatenate(out)


def record_logps(data_config, split: str, model, params, tokenizer, *, seq_len: int, batch_size: int = 16
                 ) -> tuple[list[int], list[list[float]]]:
  """(source indices of the kept records, their sequences' summed completion log-probs) of a split, the
  records read as a training run with these data options reads them."""
  cfg = data_lib.default_config()
  cfg.update(copy.deepcopy(data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)))
  cfg.ref_logps_field = cfg.aligned_logps_field = None   # the numbers being made are not read
  kind = cfg.pref_kind
  if kind == "listwise" or cfg.list_to_pairs:
    raise ValueError("precompute supports pairwise, unpaired and SFT records; listwise records are not "
                     "supported yet")
  if kind == "unpaired":
    cfg.unpaired_kl = False   # one sequence per record: KL pairs are made per batch and cannot be stored
  if not kind:
    cfg.packing = "none"      # one example per row: one number per record
  ds = data_lib.get_dataset(cfg, split, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
                            train=False)
  if kind:
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch = data_lib.layout(ds.examples, kind, seq_len=seq_len, list_size=cfg.list_size, unpaired_kl=False,
                            pad_id=pad_id)
    lps = sequence_logps(model, params, batch, batch_size)
    values = [list(map(float, lps[i, :len(ex.seqs)])) for i, ex in enumerate(ds.examples)]
  else:
    rows = [data_lib.pack(ds.examples[s:s + batch_size], batch_size, seq_len, mode="none")[0]
            for s in range(0, len(ds.examples), batch_size)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in data_lib.FIELDS}
    lps = sequence_logps(model, params, batch, batch_size)[:len(ds.examples)]
    values = [[float(lps[i, 0])] for i in range(len(ds.examples))]
  return list(ds.report.kept), values


def _with_field(record: dict, field: str, values: list[float], *, pref: bool, append: bool) -> dict:
  out = dict(record)
  if pref:
    out[field] = values if len(values) > 1 else values[0]
  elif append and field in record:
    old = record[field]
    out[field] = (list(old) if isinstance(old, (list, tuple)) else [old]) + values
  else:
    out[field] = values
  return out


def precompute(config, workdir: str) -> dict[str, str]:
  """Writes workdir/{split}.jsonl for each split of `config.splits`; returns {split: path}."""
  tokenizer = data_lib.get_tokenizer(config.data)
  model, params = load_model(config.reference)
  pref = bool(config.data.get("pref_kind"))
  field = config.get("field") or (PREF_FIELD if pref else SFT_FIELD)
  append = bool(config.get("append", False))
  if append and pref:
    raise ValueError("append=True adds one aligned model's number per run to SFT records; preference "
                     "records hold one reference log-prob per sequence")
  os.makedirs(workdir, exist_ok=True)
  written = {}
  for split in [s.strip() for s in config.splits.split(",") if s.strip()]:
    kept, values = record_logps(config.data, split, model, params, tokenizer, seq_len=int(config.seq_len),
                                batch_size=int(config.batch_size))
    source = data_lib.make_source(config.data, split)
    path = os.path.join(workdir, f"{split}.jsonl")
    data_lib.write_jsonl(path, [_with_field(source[i], field, v, pref=pref, append=append)
                                for i, v in zip(kept, values)])
    written[split] = path
    print(f"precompute: {len(kept)} records of split {split!r} with {field!r} -> {path}", flush=True)
  read = f"--config.data.ref_logps_field={field}" if pref else \
      f"--config.data.aligned_logps_field={field} --config.data.packing=none"
  print(f"train from them with --config.data.source=jsonl --config.data.path='{workdir}/{{split}}.jsonl' "
        f"{read}", flush=True)
  with open(os.path.join(workdir, "precompute.json"), "w") as f:
    json.dump({"reference": config.reference, "field": field, "append": append, "seq_len": int(config.seq_len),
               "files": written}, f, indent=2)
  return written
