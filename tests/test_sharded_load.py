"""Parameters are placed straight into their shardings: loading an HF checkpoint (or initialising a preset,
or copying the reference model) on an FSDP mesh of 8 simulated devices never puts a full unsharded copy on
one device. Checked by the bytes each device holds after the load, in a fresh 8-device process.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np

import models
from tests import train_runner

_PROBE = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, ml_collections, numpy as np
import data as data_lib
from configs import sft
from train_lib import build, sharding

def per_device(tree):
  out = np.zeros(jax.device_count(), np.int64)
  ids = {{d.id: i for i, d in enumerate(jax.devices())}}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      out[ids[s.device.id]] += s.data.nbytes
  return out.tolist()

def total(tree):
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

res = {{}}
for source in ("hf", "preset"):
  config = sft.get_config("model=tiny,smoke")
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
  if source == "hf":
    config.model.hf_path = {hf!r}
  else:
    config.model.overrides = ml_collections.ConfigDict(dict(hidden_size=256, intermediate_size=512))
  mesh = sharding.make_mesh(config.mesh)
  model, params = build.build_model(config, data_lib.get_tokenizer(config.data), mesh)
  ref = jax.tree.map(jax.numpy.copy, params)          # the trainer's frozen reference copy
  res[source] = dict(total=total(params), per_device=per_device(params), ref=per_device(ref),
                     devices=jax.device_count())
print(json.dumps(res))
"""


def test_hf_checkpoint_and_preset_load_sharded_on_8_devices(tmp_path):
  cfg = models.DecoderConfig.tiny(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2)
  model = models.Decoder(cfg)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
  hf = tmp_path / "hf"
  models.save_hf(str(hf), cfg, params, model_type="llama")
  script = _PROBE.format(root=train_runner.ROOT, hf=str(hf))
  r = subprocess.run([sys.executable, "-c", script], cwd=train_runner.ROOT, env=train_runner.env(8),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  for source, got in res.items():
    assert got["devices"] == 8
    # Every kernel and the embedding split 8 ways; only norm scales (a few KiB) are replicated.
    limit = got["total"] / 8 * 1.1
    assert max(got["per_device"]) <= limit, (source, got)
    assert max(got["ref"]) <= limit, (source, got)
    assert sum(got["per_device"]) < got["total"] * 1.5, (source, got)   # not replicated anywhere


def test_hf_path_alone_gives_the_tokenizer_when_the_directory_has_one(tmp_path):
  from configs import sft
  from train_lib import build
  config = sft.get_config("model=tiny,smoke")
  config.model.hf_path = str(tmp_path)
  assert build.with_defaults(config).data.tokenizer is None        # no tokenizer file: nothing assumed
  (tmp_path / "tokenizer.json").write_text("{}")
  assert build.with_defaults(config).data.tokenizer == str(tmp_path)
  config.data.tokenizer = "char"                                     # an explicit choice is kept
  assert build.with_defaults(config).data.tokenizer == "char"
