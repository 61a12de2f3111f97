r"""LoRA+: the B factor of every LoRA pair learns `lr_ratio` times faster than A.

Hayou, Ghosh and Yu, *LoRA+: Efficient Low Rank Adaptation of Large Models*, ICML 2024 (arXiv 2402.12354);
reference `nikhil-ghosh-berkeley/loraplus`, and HF PEFT's `peft.optimizers.create_loraplus_optimizer`,
whose parameter groups this reproduces:

.. math::

  \eta_A = \eta, \qquad \eta_B = \lambda \eta \ (\lambda = \text{lr\_ratio}), \qquad
  \eta_{emb} = \text{lr\_embedding}

with AdamW in every group. As PEFT, group B holds the `b` factors *and* every vector leaf (a LoRA bias,
DoRA's magnitude; per layer, so a stacked [L, n] leaf under `layers/` is a vector), group "embedding" holds
every leaf under the `embedding` regex (adapters on the token embedding; PEFT's `lora_embedding_A/B`), and
group A everything else. Leaves that `config.optim.no_decay` matches (biases, norms) get weight decay 0, as
PEFT's `groupB_no_decay`.

Default ratio 16, the paper's recommended setting for LLaMA-scale models (PEFT requires it explicitly).
One difference from PEFT: `lr_embedding` is a constant learning rate, where the HF Trainer's scheduler
would also scale it by the schedule's multiplier. Select with `config.optim.name=loraplus`; the options are
`config.optim.loraplus.*`.
"""
from __future__ import annotations

import re

import optax

from optim._registry import register_optimizer
from peft import map_with_path

GROUPS = ("a", "b", "embedding")


def loraplus_labels(params, embedding: str = r"embed/.*") -> optax.Params:
  """The LoRA+ group of every leaf: "embedding", "b" (a `b` factor or a per-layer vector) or "a"."""
  rx = re.compile(embedding) if embedding else None

  def group(path, x):
    if rx is not None and rx.fullmatch(path):
      return "embedding"
    per_layer_ndim = x.ndim - (1 if path.startswith("layers/") else 0)
    return "b" if path.rsplit("/", 1)[-1] == "b" or per_layer_ndim <= 1 else "a"
  return map_with_path(group, params)


def _scaled(learning_rate: optax.ScalarOrSchedule, ratio: float) -> optax.ScalarOrSchedule:
  if callable(learning_rate):
    return lambda count: ratio * learning_rate(count)
  return ratio * learning_rate


@register_optimizer("loraplus")
def loraplus(learning_rate: optax.ScalarOrSchedule, lr_ratio: float = 16.0, lr_embedding: float = 1e-6,
             embedding: str = r"embed/.*", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
             weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AdamW with learning rates eta (group A), lr_ratio * eta (group B) and lr_embedding (embeddings).

  Args:
    learning_rate: eta_A, a float or a schedule (eta_B follows the same schedule).
    lr_ratio: eta_B / eta_A (PEFT's `loraplus_lr_ratio`).
    lr_embedding: the constant learning rate of the embedding group (PEFT's `loraplus_lr_embedding`).
    embedding: regex (full match on '/' paths) of the embedding group's leaves.
    b1, b2, eps, weight_decay: AdamW's (torch.optim.AdamW's defaults; PEFT's `loraplus_weight_decay`).
  """
  if lr_ratio <= 0:
    raise ValueError(f"lr_ratio must be positive, got {lr_ratio}")
  adamw = lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.multi_transform(
      {"a": adamw(learning_rate), "b": adamw(_scaled(learning_rate, lr_ratio)), "embedding": adamw(lr_embedding)},
      lambda params: loraplus_labels(params, embedding))
