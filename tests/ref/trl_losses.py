"""TRL's own loss code on given per-token log-probs / logits (runs inside .venv-ref).

    trl_losses.py IN.npz OUT.npz --cases=<json list>

Each case names a TRL trainer and its settings. The script builds a trainer object without running its
`__init__` (no model, tokenizer or dataset), sets the attributes the loss code reads, and calls TRL's
loss method with a stand-in model that returns the given log-probs or logits:
  dpo    DPOTrainer.compute_ref_log_probs + DPOTrainer._compute_loss (precompute_ref_logps path)
  kto    KTOTrainer._compute_loss (precompute_ref_logps path)
  cpo    CPOTrainer.get_batch_loss_metrics (CPOConfig applies its own `alphapo` shorthand)
  orpo   ORPOTrainer.get_batch_loss_metrics
  cdpo   CPOTrainer.cpo_loss on given log-ratios (its smoothed sigmoid is cDPO)
Outputs `loss_<i>` and `m_<i>_<metric>` ('/' in metric names written as '.').
"""
import contextlib
import json
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import torch

from _common import parse_args, save


class Accelerator:
  device = torch.device("cpu")

  def gather(self, x):
    return x

  def gather_for_metrics(self, x):
    return x

  def autocast(self):
    return contextlib.nullcontext()

  def unwrap_model(self, m):
    return m


class FakeModel(torch.nn.Module):
  """Returns fixed outputs; `pick(args, kwargs)` chooses among several (KTO's KL pass)."""
  is_gradient_checkpointing = False

  def __init__(self, outputs, pick=None):
    super().__init__()
    self.outputs, self.pick = outputs, pick

  def forward(self, *args, **kwargs):
    return self.outputs if self.pick is None else self.pick(args, kwargs)


def bare(cls, **attrs):
  obj = object.__new__(cls)
  obj.__dict__.update(accelerator=Accelerator(), aux_loss_enabled=False, _tp_size=1,
                      _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
                      args=SimpleNamespace(gradient_checkpointing_kwargs=None), ref_model=None)
  obj.__dict__.update(attrs)
  return obj


def t(a, dtype):
  return torch.tensor(a, dtype=dtype)


def rows(x):
  """[B, 2, ...] -> TRL's [chosen rows; rejected rows]."""
  return torch.cat([x[:, 0], x[:, 1]], 0)


def lm_outputs(log_probs, **extra):
  n, s = log_probs.shape
  return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(n, s, dtype=log_probs.dtype),
                         mean_logits=torch.zeros(n, s, dtype=log_probs.dtype),
                         is_top1=torch.zeros(n, s, dtype=torch.bool), aux_loss=None, **extra)


def last_metrics(trainer):
  return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def run_dpo(a, c, dtype):
  from trl.trainer.dpo_trainer import DPOTrainer
  shift_mask = rows(t(a["dpo_mask"], dtype))
  completion_mask = torch.cat([torch.zeros(shift_mask.shape[0], 1, dtype=dtype), shift_mask], 1).long()
  n, s = completion_mask.shape
  inputs = {"input_ids": torch.ones(n, s, dtype=torch.long),
            "attention_mask": torch.ones(n, s, dtype=torch.long), "completion_mask": completion_mask}
  policy = FakeModel(lm_outputs(rows(t(a["dpo_tlp_pol"], dtype)) * shift_mask,
                                log_sum_sq_probs=rows(t(a["dpo_lssp"], dtype))))
  reference = FakeModel(lm_outputs(rows(t(a["dpo_tlp_ref"], dtype)) * shift_mask))
  trainer = bare(DPOTrainer, model=policy, beta=c["beta"], precompute_ref_logps=True,
                 loss_types=c["loss_type"], loss_weights=c.get("loss_weights") or [1.0] * len(c["loss_type"]),
                 ld_alpha=c.get("ld_alpha"), f_divergence_type=c.get("f_divergence_type", "reverse_kl"),
                 f_alpha_divergence_coef=c.get("f_alpha_divergence_coef", 0.5),
                 label_smoothing=c.get("label_smoothing", 0.0), use_weighting=c.get("use_weighting", False))
  trainer.args.discopop_tau = c.get("discopop_tau", 0.05)
  ref_c, ref_r = trainer.compute_ref_log_probs(reference, inputs)
  inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
  loss = trainer._compute_loss(policy, inputs, return_outputs=False)
  return loss, last_metrics(trainer)


def run_kto(a, c, dtype):
  from trl.trainer.kto_trainer import KTOTrainer
  mask, kl_mask = t(a["kto_mask"], dtype), t(a["kto_kl_mask"], dtype)
  n, s = mask.shape
  pad = torch.zeros(n, 1, dtype=dtype)
  inputs = {"input_ids": torch.ones(n, s + 1, dtype=torch.long),
            "attention_mask": torch.ones(n, s + 1, dtype=torch.long),
            "completion_mask": torch.cat([pad, mask], 1).long(),
            "KL_input_ids": torch.full((n, s + 1), 2, dtype=torch.long),
            "KL_attention_mask": torch.ones(n, s + 1, dtype=torch.long),
            "KL_completion_mask": torch.cat([pad, kl_mask], 1).long(),
            "label": torch.tensor(a["kto_label"], dtype=torch.bool),
            "ref_logps": t(a["kto_ref_logps"], dtype), "ref_KL_logps": t(a["kto_ref_kl_logps"], dtype)}
  main = lm_outputs(t(a["kto_tlp"], dtype) * mask)
  kl = lm_outputs(t(a["kto_kl_tlp"], dtype) * kl_mask)
  policy = FakeModel(None, pick=lambda args, kw: kl if bool((kw["input_ids"] == 2).all()) else main)
  trainer = bare(KTOTrainer, model=policy, beta=c["beta"], precompute_ref_logps=True,
                 loss_type=c.get("loss_type", "kto"), calculate_KL=c.get("loss_type", "kto") == "kto",
                 desirable_weight=c.get("desirable_weight", 1.0),
                 undesirable_weight=c.get("undesirable_weight", 1.0))
  loss = trainer._compute_loss(policy, inputs, return_outputs=False)
  return loss, last_metrics(trainer)


def concatenated_batch(a, dtype):
  ids, attn = torch.tensor(a["po_ids"], dtype=torch.long), torch.tensor(a["po_attn"], dtype=torch.long)
  labels = ids.masked_fill(attn == 0, -100)
  labels[..., 0] = -100  # the one-token prompt
  batch = {}
  for k, name in enumerate(("chosen", "rejected")):
    batch.update({f"{name}_input_ids": ids[:, k], f"{name}_attention_mask": attn[:, k],
                  f"{name}_labels": labels[:, k]})
  logits = rows(t(a["po_logits"], dtype))
  return batch, FakeModel(SimpleNamespace(logits=logits))


def run_cpo(a, c, dtype):
  from trl.experimental.cpo.cpo_config import CPOConfig
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  with tempfile.TemporaryDirectory() as tmp:
    cfg = CPOConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False,
                    loss_type=c["loss_type"], beta=c["beta"],
                    label_smoothing=c.get("label_smoothing", 0.0), cpo_alpha=c.get("cpo_alpha", 1.0),
                    simpo_gamma=c.get("simpo_gamma", 0.5), alpha=c.get("alpha", 0.0))
  trainer = bare(CPOTrainer, is_encoder_decoder=False, pad_token_id=0, beta=cfg.beta,
                 label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type, cpo_alpha=cfg.cpo_alpha,
                 simpo_gamma=cfg.simpo_gamma, alpha=cfg.alpha)
  batch, model = concatenated_batch(a, dtype)
  return trainer.get_batch_loss_metrics(model, batch)


def run_orpo(a, c, dtype):
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer
  trainer = bare(ORPOTrainer, is_encoder_decoder=False, padding_value=0, beta=c["beta"])
  batch, model = concatenated_batch(a, dtype)
  return trainer.get_batch_loss_metrics(model, batch)


def run_cdpo(a, c, dtype):
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  trainer = bare(CPOTrainer, beta=c["beta"], label_smoothing=c["label_smoothing"], loss_type="sigmoid",
                 alpha=0.0)
  losses, _, _ = trainer.cpo_loss(t(a["cdpo_rho_c"], dtype), t(a["cdpo_rho_r"], dtype))
  return losses.mean(), {}


RUNNERS = {"dpo": run_dpo, "kto": run_kto, "cpo": run_cpo, "orpo": run_orpo, "cdpo": run_cdpo}


def main():
  arrays, out, kw = parse_args()
  cases = json.loads(kw["cases"])
  result = {}
  for i, c in enumerate(cases):
    dtype = {"float64": torch.float64, "float32": torch.float32}[c.get("dtype", "float64")]
    torch.set_default_dtype(dtype)  # TRL builds a few constants with torch.tensor(float)
    try:
      loss, metrics = RUNNERS[c["trainer"]](arrays, c, dtype)
    except Exception as e:  # name the failing case
      raise RuntimeError(f"case {i} {c}: {e!r}") from e
    result[f"loss_{i}"] = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    for k, v in metrics.items():
      result[f"m_{i}_{k.replace('/', '.')}"] = float(v)
  save(out, **result)


if __name__ == "__main__":
  sys.exit(main())
