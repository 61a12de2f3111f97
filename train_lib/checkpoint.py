"""orbax checkpoints of the train state and the data iterator's position.

Only the trainable part of the parameters is in the state (the frozen base of an adapter run is rebuilt
from its source), so an adapter run's checkpoint holds adapter tensors and their optimizer state only.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=True),
        item_names=("state", "data", "frozen"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False, frozen=None) -> bool:
    """`frozen` is saved only by runs that write trained values into it (layer sampling)."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    if frozen is not None:
      items["frozen"] = ocp.args.StandardSave(frozen)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, abstract_frozen=None):
    """abstract_*: trees of jax.ShapeDtypeStruct (with shardings) shaped like what was saved.
    Returns (state, data_state, frozen or None)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if abstract_frozen is not None:
      items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
    r = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return r["state"], r["data"], (r["frozen"] if abstract_frozen is not None else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
