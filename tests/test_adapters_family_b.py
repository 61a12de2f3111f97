"""Structured and mixture adapters (FLoRA, Compacter, MoS, LoRAMoE) and the LoRA optimizers (LoRA+, LoRA-FA).

Adapters: each forward against a float64 numpy evaluation of its paper's formula on one stacked matrix, the
merge equal to the unmerged forward, the trainable-parameter count equal to the paper's formula.
LoRAMoE: the localized balancing loss against its formula, and that it reaches the gradient through the
general auxiliary-loss mechanism (`peft.sow` -> the decoder's scan -> `losses.add_aux_losses`).
Optimizers: one step of PEFT 0.21's `create_loraplus_optimizer` (AdamW groups) and two of
`create_lorafa_optimizer` (reference environment, one subprocess for the file).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import optim
import peft
from tests import refenv

LR, RATIO, LR_EMB, WD, FA_STEPS = 1e-2, 16.0, 1e-3, 0.1, 2


# ===========================================================================================================
# LoRA+ / LoRA-FA against PEFT
# ===========================================================================================================
@pytest.fixture(scope="module")
def peft_steps():
  refenv.require()
  return refenv.run("peft_optimizers", lr=LR, ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD, steps=FA_STEPS)


def _optim_cfg(name, **options):
  c = optim.default_config()
  c.name, c.learning_rate, c.warmup_steps, c.schedule, c.grad_clip_norm = name, LR, 0, "constant", 0.0
  c[name].update(options)
  return c


def _lora(a, b, scale=1.0):
  return peft.LoRA(None, jnp.asarray(a), jnp.asarray(b), scale=scale)


def test_loraplus_groups():
  tree = {"embed": {"embedding": _lora(np.ones((10, 2)), np.ones((2, 6)))},
          "layers": {"q": {"kernel": _lora(np.ones((3, 6, 2)), np.ones((3, 2, 5))), "bias": np.ones((3, 5))}},
          "lm_head": {"kernel": np.ones((6, 4))}}
  labels = peft.flatten(optim.loraplus_labels(tree))
  assert labels == {"embed/embedding/a": "embedding", "embed/embedding/b": "embedding",
                    "layers/q/kernel/a": "a", "layers/q/kernel/b": "b", "layers/q/bias": "b",
                    "lm_head/kernel": "a"}


@pytest.mark.parity
def test_loraplus_matches_peft(peft_steps):
  r = {k[len("plus_"):]: v for k, v in peft_steps.items() if k.startswith("plus_")}
  # torch layout -> ours: lora_A [r, in] = a^T, lora_B [out, r] = b^T (the element-wise step does not care).
  tree = lambda s: {"embed": {"embedding": _lora(r[f"emb_A_{s}"].T, r[f"emb_B_{s}"].T)},
                    "proj": {"kernel": _lora(r[f"proj_A_{s}"].T, r[f"proj_B_{s}"].T),
                             "bias": jnp.asarray(r[f"proj_bias_{s}"])}}
  params, grads = tree("w0"), tree("g")
  tx, _ = optim.make(_optim_cfg("loraplus", lr_ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD), params, 10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = peft.flatten(jax.tree.map(lambda p, u: p + u, params, updates))
  want = peft.flatten(tree("w1"))
  old = peft.flatten(params)
  for k in want:
    # Steps of 1e-3..0.16 on weights of |w| < 4: atol is one float32 ulp of torch's w + u; rtol covers
    # optax's float32 bias correction 1 - 0.999^t (torch takes it in double: 6e-6 apart at t = 1).
    np.testing.assert_allclose(new[k] - old[k], want[k] - old[k], rtol=1e-5, atol=2.5e-7, err_msg=k)


@pytest.mark.parity
def test_lorafa_matches_peft(peft_steps):
  r = peft_steps
  params = {"proj": {"kernel": _lora(r["fa_A"].T, r["fa_B0"].T, scale=4 / 2)}}
  tx, _ = optim.make(_optim_cfg("lorafa", weight_decay=WD), params, 10)
  state = tx.init(params)
  assert not any(x.shape == params["proj"]["kernel"].a.shape for x in jax.tree.leaves(state)), "A has state"
  step = jax.jit(tx.update)
  for t in range(FA_STEPS):
    # A's gradient is non-zero here: LoRA-FA must ignore it (PEFT's A has none).
    grads = {"proj": {"kernel": _lora(np.full(r["fa_A"].T.shape, 0.3, np.float32), r[f"fa_g{t}"].T, 2.0)}}
    updates, state = step(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  node = params["proj"]["kernel"]
  np.testing.assert_array_equal(node.a, r["fa_A"].T)
  b0 = r["fa_B0"].T
  np.testing.assert_allclose(np.asarray(node.b) - b0, r["fa_B"].T - b0, rtol=1e-5, atol=1e-7)
