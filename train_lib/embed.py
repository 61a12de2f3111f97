"""A frozen model's embeddings of preference records, precomputed into the records.

DPO-Kernels can run its frozen encoder inside every step (`embedding_source="frozen_encoder"`) or read the
embeddings from the data (`embedding_source="batch"`, `data.embeddings_field="e_x,e_c,e_r"`). This writes the
second from the first, once, so that a large encoder need not sit beside the policy during training:

    records = [json.loads(line) for line in open("train.jsonl")]
    records = embed.embed_records(records, config)          # adds "e_x", "e_c", "e_r" to each record
    # write them back as JSONL, then train with --config.data.embeddings_field=e_x,e_c,e_r

The embeddings equal the ones the trainer computes with `frozen_encoder` (same tokens, same pooling).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

import data as data_lib
import losses
import models

POOLED = {"mean": ("prompt_embeddings", "embeddings"), "last": ("prompt_last_embeddings", "last_embeddings")}


def embed_records(records: Sequence[dict], config, *, encoder_path: str | None = None, pool: str | None = None,
                  batch_size: int = 16, fields: Sequence[str] = ("e_x", "e_c", "e_r")) -> list[dict[str, Any]]:
  """Copies of the pairwise `records` ({"prompt", "chosen", "rejected", ...}) with the prompt, chosen and
  rejected embeddings of the frozen checkpoint `encoder_path` (default `config.loss.encoder_path`) added as
  `fields`, pooled by `pool` (default `config.loss.embedding_pool`: mean or last), tokenized as the run
  tokenizes them (`config.data`, `config.seq_len`)."""
  encoder_path = encoder_path or config.loss.get("encoder_path")
  if not encoder_path:
    raise ValueError("embed_records needs a frozen checkpoint: encoder_path= or config.loss.encoder_path")
  pool = pool or config.loss.get("embedding_pool", "mean")
  if pool not in POOLED:
    raise ValueError(f"pool={pool!r}; valid: {', '.join(POOLED)}")
  tokenizer = data_lib.get_tokenizer(config.data)
  model_cfg, params = models.load_hf(encoder_path)
  model = models.Decoder(model_cfg)
  needs = frozenset({"embeddings" if pool == "mean" else "last_hidden"})
  forward = jax.jit(lambda p, b: losses.model_outputs(model, p, b, needs))
  prompt_key, seq_key = POOLED[pool]
  out = []
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    recs = [data_lib.record_preference(r, "pairwise")[0] for r in chunk]
    batch = data_lib.preference_batch(recs, config.data, tokenizer=tokenizer, seq_len=int(config.seq_len))
    o = jax.device_get(forward(params, {k: batch[k] for k in data_lib.FIELDS}))
    e = (o[prompt_key][:, 0], o[seq_key][:, 0], o[seq_key][:, 1])
    for i, rec in enumerate(chunk):
      out.append({**rec, **{name: np.asarray(v[i], np.float64).tolist() for name, v in zip(fields, e)}})
  return out
