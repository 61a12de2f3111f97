"""One loss signature and a registry by name.

    loss, metrics = loss_fn(policy, reference, batch, cfg)

`policy` and `reference` are `Outputs` dicts for K sequences per example (K = 1 for SFT, 2 for pairwise
with index 0 = chosen and 1 = rejected, K for listwise), computed in one batched forward pass. All values
are float32. Keys (a loss declares the optional ones it needs with `register(..., needs=...)`, and the
trainer computes only those):

    logps        [B, K]        summed log-prob of the completion tokens                       always
    token_logps  [B, K, T]     per-token log-prob of the target token                         always
    mask         [B, K, T]     1.0 on completion (loss) tokens                                always
    lengths      [B, K]        mask.sum(-1)                                                   always
    logz         [B, K, T]     log-partition (logsumexp of the logits), for z-loss            "logz"
    embeddings   [B, K, D]     mean of the final hidden states over the loss positions        "embeddings"
    prompt_embeddings [B, K, D]  mean over the prompt's input positions (bos + prompt tokens,  "embeddings"
                               `losses._outputs.prompt_positions`): no response token seen
    prompt_last_embeddings [B, K, D]  hidden state at the last prompt token                    "last_hidden"
    last_embeddings [B, K, D]  hidden state at the last real input (eos): prompt + response    "last_hidden"
    last_logits  [B, K, V]     logits at the last completion token (log_softmax-able)         "last_logits"
    logits       [B, K, T, V]  all logits (memory heavy: anchored SFT's full-vocabulary KL)   "logits"
    log_sum_sq_probs [B, K, T] log sum_v p_v^2 per token (WPO's weights)                        "log_sum_sq_probs"
    token_embeddings [V, D]    the model's input embedding table, detached (a ground cost)    "token_embeddings"

`reference` is None when the loss does not declare "reference" in `needs`. Outputs that only some settings
need are declared by `needs_fn(cfg)` (WPO's weights when `use_weighting`). `losses.model_outputs` computes
them.

A loss that trains parameters of its own declares them with `params=LossParams(batch_key, init)`:
`init(cfg, hidden_size, rng)` returns their initial pytree (or None when this configuration trains none);
the trainer keeps them in the trainable tree and hands them to the loss, inside the differentiated
function, as `batch[batch_key]`. A loss that reads a second, frozen model declares it with
`frozen_model=FrozenModel(batch_key, path, needs)`: when `path(cfg)` names a Hugging Face checkpoint
directory, the trainer loads it (`models.load_hf`), runs it on the batch's tokens inside the step and hands
its `Outputs` (those `needs(cfg)` names), detached, to the loss as `batch[batch_key]` (DPO-Kernels'
frozen encoder). `batch` is the model batch
(tokens etc. with a [B, K, T] layout) plus task fields (e.g. `scores` [B, K] for lists, `label` [B] for
unpaired data, `list_mask` [B, K]). `cfg` is the `config.loss` ConfigDict. Metrics use TRL's names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

Outputs = Mapping[str, jax.Array]
LossFn = Callable[[Outputs, Outputs | None, Mapping[str, Any], Any], tuple[jax.Array, dict]]

NEEDS = ("reference", "logz", "embeddings", "last_hidden", "last_logits", "logits", "log_sum_sq_probs",
         "token_embeddings")


class LossParams(NamedTuple):
  batch_key: str                                   # where the loss reads them: batch[batch_key]
  init: Callable[[Any, int, jax.Array], Any]       # (cfg, hidden_size, rng) -> pytree or None


class FrozenModel(NamedTuple):
  batch_key: str                                   # where the loss reads its outputs: batch[batch_key]
  path: Callable[[Any], Optional[str]]             # cfg -> checkpoint directory, or None (not used)
  needs: Callable[[Any], Any]                      # cfg -> the outputs the loss reads from it


@dataclasses.dataclass(frozen=True)
class LossEntry:
  name: str
  fn: LossFn
  needs: frozenset
  kind: str          # "sft" | "pairwise" | "unpaired" | "listwise"
  carry: tuple = ()  # ((metric name, batch field), ...): running state the trainer feeds back each step
  needs_fn: Optional[Callable[[Any], Any]] = None   # cfg -> extra needs of this configuration
  params: Optional[LossParams] = None               # parameters the loss trains
  frozen_model: Optional[FrozenModel] = None        # a frozen model whose outputs the loss reads

  def needs_for(self, cfg) -> frozenset:
    """The outputs this loss needs under `cfg` (`config.loss`)."""
    extra = set(self.needs_fn(cfg)) if self.needs_fn is not None else set()
    unknown = extra - set(NEEDS)
    if unknown:
      raise ValueError(f"loss {self.name!r} needs unknown outputs {sorted(unknown)}; valid: {NEEDS}")
    return frozenset(self.needs) | frozenset(extra)

  def init_params(self, cfg, hidden_size: int, rng) -> Any:
    """The initial parameters this loss trains under `cfg`, or None."""
    return None if self.params is None else self.params.init(cfg, hidden_size, rng)

  def frozen_model_path(self, cfg) -> Optional[str]:
    """The checkpoint of the frozen model this loss reads under `cfg`, or None."""
    return None if self.frozen_model is None else self.frozen_model.path(cfg)


_REGISTRY: dict[str, LossEntry] = {}
_RETIRED: dict[str, str] = {}     # old name -> why it is gone and what to use instead


def retire(name: str, message: str) -> None:
  """Makes `get(name)` raise `message`: a name that would now be ambiguous is refused, not guessed."""
  if name in _REGISTRY:
    raise ValueError(f"loss {name!r} is registered; it cannot also be retired")
  _RETIRED[name] = message


def register(name: str, *, needs=(), kind: str = "pairwise", carry=(), needs_fn=None,
             params: Optional[LossParams] = None, frozen_model: Optional[FrozenModel] = None):
  """Decorator: `@register("dpo", needs=("reference",))`.

  `carry` lists (metric, batch field) pairs: the trainer puts the value a step returned as `metric` into the
  next step's batch as `field` and checkpoints it (BCO's running reward mean)."""
  unknown = set(needs) - set(NEEDS)
  if unknown:
    raise ValueError(f"loss {name!r} needs unknown outputs {sorted(unknown)}; valid: {NEEDS}")

  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"loss {name!r} registered twice")
    _REGISTRY[name] = LossEntry(name, fn, frozenset(needs), kind, tuple(carry), needs_fn, params,
                                frozen_model)
    return fn
  return deco


def get(name: str) -> LossEntry:
  if name in _RETIRED:
    raise ValueError(f"loss {name!r} no longer exists: {_RETIRED[name]}")
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)
