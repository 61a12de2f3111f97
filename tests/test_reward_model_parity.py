"""Hugging Face sequence-classification checkpoints (reward models) as judges: the score head and the
position transformers reads it at, equal to transformers (reference environment)."""
import json
import os

import numpy as np
import pytest

import data
import models
from tests import refenv
from train_lib import export_files
from train_lib import judges

pytestmark = pytest.mark.parity

NAMES, PADS = ("llama", "qwen2"), (2, 0)     # llama's pad is its eos (2): the score is read before it


def _tokens(pad):
  rng = np.random.default_rng(0)
  t = rng.integers(3, 97, size=(4, 12)).astype(np.int32)
  t[1, 8:] = pad                   # right padding
  t[2, 5] = pad                    # a pad token inside the text: transformers reads the last non-pad one
  t[3, 10:] = pad
  return t


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
  refenv.require()
  root = tmp_path_factory.mktemp("rm")
  out = {}
  for name, pad in zip(NAMES, PADS):
    ref = refenv.run("hf_reward_model", {"tokens": _tokens(pad)}, root=str(root), names=name, pads=str(pad))
    out[name] = (str(root / name), pad, ref[f"scores_{name}"])
  return out


@pytest.mark.parametrize("name", NAMES)
def test_score_head_equals_transformers(reward_models, name):
  path, pad, want = reward_models[name]
  cfg, params = models.load_hf(path, head="score")
  tokens = _tokens(pad)
  scores = np.asarray(models.Decoder(cfg).apply(params, tokens))       # [B, T, 1]
  got = [scores[b, models.score_position(tokens[b], pad), 0] for b in range(len(tokens))]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert [models.score_position(t, pad) for t in tokens][1:3] == [7, 11]


def test_head_must_match_the_checkpoint(reward_models):
  path, _, _ = reward_models["llama"]
  with pytest.raises(ValueError, match="head='score'"):
    models.load_hf(path)


def test_reward_model_judge_equals_transformers(reward_models):
  path, pad, _ = reward_models["llama"]
  export_files.char_tokenizer_json(data.CharTokenizer(), os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)
  tok = data.load_tokenizer(path)
  assert tok.eos_id == pad
  prompts, texts = ["12+3=", "9+9=", "7+1="], ["15", "18", "9"]
  got = judges.make_judge("rm:" + path, batch_size=2)(prompts, texts)
  seqs = [data.encode_prompt(tok, p) + tok.encode(t) + [tok.eos_id] for p, t in zip(prompts, texts)]
  T = max(len(s) for s in seqs)
  tokens = np.full((len(seqs), T), pad, np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  want = refenv.run("hf_reward_model", {"tokens": tokens}, load=path)["scores"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert len(set(np.round(got, 4))) == 3          # three different responses, three different scores
