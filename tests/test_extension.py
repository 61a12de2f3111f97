"""A newcomer's extensions, registered in this file only, run through the unchanged trainer: an optimizer with
work between steps (a host hook) and a loss that trains a parameter of its own. Nothing in train_lib/ is
touched or told about them.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hooks
import losses
import optim
import train_lib
from configs import sft

CALLS = []


# ---- an optimizer whose learning rate a host hook rescales between steps -------------------------------
class HostFactorState(NamedTuple):
  factor: jax.Array      # () float32, rewritten on the host by the hook


@optim.register_optimizer("test_host_factor_sgd")
def host_factor_sgd(learning_rate, momentum: float = 0.0, every: int = 2):
  del every    # read by the hook from this optimizer's config section
  def init(params):
    return HostFactorState(jnp.ones((), jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: g * state.factor, updates), state

  return optax.chain(optax.GradientTransformation(init, update), optax.sgd(learning_rate, momentum or None))


@hooks.register_hook("test_host_factor", enabled=lambda config: config.optim.name == "test_host_factor_sgd")
def _host_factor_hook(config, model):
  del model

  def refresh(step, state, frozen, tx):
    del tx
    CALLS.append(step)
    is_state = lambda x: isinstance(x, HostFactorState)
    opt_state = jax.tree.map(lambda s: s._replace(factor=jnp.asarray(0.5, jnp.float32)) if is_state(s) else s,
                             state.opt_state, is_leaf=is_state)
    return state._replace(opt_state=opt_state), frozen, {"test/factor": 0.5}

  return hooks.HostHook(every=config.optim.test_host_factor_sgd.every, refresh=refresh)


# ---- a loss with a trained temperature ------------------------------------------------------------------
@losses.register("test_tempered_nll", kind="sft",
                 params=losses.LossParams("log_temp", lambda cfg, hidden, rng: jnp.zeros((), jnp.float32)))
def tempered_nll(policy, reference, batch, cfg):
  del reference, cfg
  t = jnp.exp(batch["log_temp"])
  nll = -(policy["token_logps"] * policy["mask"]).sum() / jnp.maximum(policy["mask"].sum(), 1.0)
  loss = nll * t + (t - 1.0) ** 2      # the temperature is pulled towards the NLL's own scale
  return loss, {"temp": t}


def test_an_optimizer_with_host_work_and_a_loss_with_parameters_need_no_trainer_change(tmp_path):
  config = sft.get_config("model=tiny,smoke")
  config.optim.name = "test_host_factor_sgd"       # its section exists: generated from the keyword defaults
  config.optim.test_host_factor_sgd.every = 3
  config.optim.learning_rate = 0.1
  config.loss.name = "test_tempered_nll"
  config.eval_before = False
  CALLS.clear()
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  assert CALLS == [0, 3, 6]                           # the hook ran every 3 steps of 8
  log_temp = np.asarray(summary["state"].params["loss_params"])
  assert log_temp != 0.0                             # the loss's own parameter trained with the model
  lines = [l for l in open(tmp_path / "metrics.jsonl")]
  assert any("test/factor" in l for l in lines)       # the hook's metrics were logged
