"""End to end: LoRA-family SFT through `train_lib.train_and_evaluate` (configs/lora.py, shrunk) trains the
adapters only, and the checkpoint holds adapter tensors and their optimizer state, nothing of the base."""
import json
import os

import jax
import numpy as np
import pytest

import peft
import train_lib
from configs import lora


def _saved_arrays(workdir, step):
  """{tree path: written} of the orbax state checkpoint (None leaves are recorded but not written)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA")) as f:
    meta = json.load(f)["tree_metadata"]
  return {tuple(k["key"] for k in v["key_metadata"]): v["value_metadata"]["value_type"] != "None"
          for v in meta.values()}


@pytest.mark.slow
@pytest.mark.parametrize("arg,fields", [("adapter=lora", {"a", "b"}),
                                        ("adapter=dora,quantize=nf4,init=pissa", {"a", "b", "m"})])
def test_adapter_sft_checkpoints_only_adapters(tmp_path, arg, fields):
  c = lora.get_config(f"model=tiny,smoke,{arg}")
  c.eval_before = False
  c.eval.num_examples = 0
  summary = train_lib.train_and_evaluate(c, str(tmp_path))

  trainable = peft.flatten(jax.device_get(summary["state"].params))
  assert trainable and {p.rsplit("/", 1)[1] for p in trainable} == fields
  assert len(trainable) == 7 * len(fields)                    # all-linear: 7 kernels per layer stack
  # B started at 0 (default init) or at PiSSA's factor; training moved it.
  assert any(np.abs(v).max() > 0 for p, v in trainable.items() if p.endswith("/b"))
  frozen = jax.tree.leaves(summary["frozen"], is_leaf=peft.is_adapter)
  if "quantize" in arg:
    nodes = [l for l in frozen if peft.is_adapter(l)]
    assert nodes and all(isinstance(n.base, peft.QuantizedWeight) for n in nodes)

  written = [k for k, w in _saved_arrays(str(tmp_path), c.total_steps).items() if w]
  params_written = [k for k in written if k[0] == "params"]
  assert params_written and all(k[-1] in fields for k in params_written)
  opt_written = [k for k in written if k[0] == "opt_state" and k[-1] not in ("count",)]
  assert opt_written and all(k[-1] in fields for k in opt_written), opt_written[:5]
