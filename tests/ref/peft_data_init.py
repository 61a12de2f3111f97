"""PEFT 0.21's CorDA, LoRA-GA and LoftQ inits, and exported adapters loaded on transformers models (runs in
.venv-ref; one call computes everything tests/test_adapters_data_init_peft.py compares).

    peft_data_init.py IN.npz OUT.npz --r=R --alpha=ALPHA --loftq=JSON --jobs=JSON

IN: `w1` [h, in], `w2` [out, h] (torch layout) of the chain y = l2(tanh(l1(x))) without biases; `x`
[N, B, T, in] calibration inputs and `y` [N, B, T, out] targets; `lw<k>` [out, in] LoftQ weights; `tokens`.
OUT, with L in (l1, l2):
  corda_<mode>_<L>_{A,B,W}   mode ipm | kpm: lora_A [r, in], lora_B [out, r], the residual base weight.
                             Covariances from one forward per sequence (PEFT's hook needs a batch of one).
  loraga_<L>_{A,B,W}         ArB2r, stable scale (PEFT's defaults); train_step = loss.backward() per batch
                             of the mean squared error, so PEFT's gradient is the mean over the N batches.
  loftq_<k>_{Q,A,B}          `loftq_init(lw<k>, bits, r_k, iter)` for the k-th entry {bits, r, iter} of --loftq.
                             PEFT calls bitsandbytes (absent here, and it needs a GPU): a stand-in module does
                             what its NF4 (blocks of 64 of the flattened [out, in] weight, absmax, nearest level
                             of its table, compress_statistics=False) and int8 (one absmax per row) round trips
                             do, and the weight is a tensor whose `.to(device)` stays on the CPU.
  logits_<j>                 job j of --jobs ({"base": model dir, "adapter": adapter dir}): the transformers
                             model with `PeftModel.from_pretrained` (every file tensor checked loaded).
"""
import json
import sys
import types

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from peft.utils import get_peft_model_state_dict, loftq_utils
from safetensors.torch import load_file

from _common import parse_args, save

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])   # bitsandbytes' NF4 code book (functional.get_4bit_type("nf4"))


class Chain(torch.nn.Module):
  def __init__(self, w1, w2):
    super().__init__()
    self.l1 = torch.nn.Linear(w1.shape[1], w1.shape[0], bias=False)
    self.l2 = torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False)
    with torch.no_grad():
      self.l1.weight.copy_(w1)
      self.l2.weight.copy_(w2)

  def forward(self, x):
    return self.l2(torch.tanh(self.l1(x)))


def factors(model, prefix, out):
  for name in ("l1", "l2"):
    layer = getattr(model.base_model.model, name)
    out[f"{prefix}_{name}_A"] = layer.lora_A["default"].weight.detach().numpy()
    out[f"{prefix}_{name}_B"] = layer.lora_B["default"].weight.detach().numpy()
    out[f"{prefix}_{name}_W"] = layer.base_layer.weight.detach().numpy()


def corda(w1, w2, x, r, alpha, mode, out):
  model = Chain(w1, w2)
  cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["l1", "l2"], init_lora_weights="corda",
                   corda_config=CordaConfig(corda_method=mode))

  def run_model():
    for batch in x:
      for row in batch:
        model(row[None])

  preprocess_corda(model, cfg, run_model=run_model)
  factors(get_peft_model(model, cfg), f"corda_{mode}", out)


def loraga(w1, w2, x, y, r, alpha, out):
  model = Chain(w1, w2)
  cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["l1", "l2"], init_lora_weights="lora_ga",
                   lora_ga_config=LoraGAConfig())

  def train_step():
    for xb, yb in zip(x, y):
      torch.mean((model(xb) - yb) ** 2).backward()

  preprocess_loraga(model, cfg, train_step)
  torch.manual_seed(0)
  factors(get_peft_model(model, cfg), "loraga", out)


# ---- a bitsandbytes stand-in for `loftq_init` -------------------------------------------------------
class _Quantized:
  def __init__(self, data, state):
    self.data, self.quant_state = data, state

  def to(self, *args, **kwargs):
    return self


def _params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4", blocksize=64):
  assert quant_type == "nf4" and not compress_statistics
  flat = w.detach().float().reshape(-1)
  n = flat.numel()
  pad = (-n) % blocksize
  blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
  absmax = blocks.abs().amax(1)
  normed = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]
  codes = (normed[..., None] - NF4).abs().argmin(-1)
  return _Quantized(codes, (absmax, tuple(w.shape), n))


def _dequantize_4bit(codes, state):
  absmax, shape, n = state
  return (NF4[codes] * absmax[:, None]).reshape(-1)[:n].reshape(shape)


def _int8params(w, requires_grad=False):
  w = w.detach().float()
  scb = w.abs().amax(1)
  q = _Quantized(torch.round(w * (127.0 / scb[:, None])).to(torch.int8), None)
  q.SCB = scb
  return q


def _int8_vectorwise_dequant(codes, scb):
  return codes.float() * scb.view(-1, 1) * 7.874015718698502e-3


class StaysOnCPU(torch.Tensor):
  """`loftq_init` moves the weight to a GPU; this tensor (and every result computed from it) ignores devices."""

  @classmethod
  def __torch_function__(cls, func, types_, args=(), kwargs=None):
    kwargs = dict(kwargs or {})
    if func is torch.Tensor.to:
      kwargs.pop("device", None)
      args = tuple(a for a in args if not isinstance(a, (str, torch.device)))
    return super().__torch_function__(func, types_, args, kwargs)


def install_bnb_stand_in():
  bnb = types.ModuleType("bitsandbytes")
  bnb.nn = types.SimpleNamespace(Params4bit=_params4bit, Int8Params=_int8params)
  bnb.functional = types.SimpleNamespace(dequantize_4bit=_dequantize_4bit,
                                         int8_vectorwise_dequant=_int8_vectorwise_dequant)
  sys.modules["bitsandbytes"] = bnb
  loftq_utils.is_bnb_available = lambda: True
  loftq_utils.is_bnb_4bit_available = lambda: True


def plain(t):
  return t.as_subclass(torch.Tensor).detach().numpy()


# ---- exported adapters on transformers models -------------------------------------------------------
def load_job(job, tokens):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      job["base"], dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  bad = {key: v for key, v in info.items() if v}
  if bad:
    raise SystemExit(f"{job['base']}: transformers did not load every tensor: {bad}")
  model = PeftModel.from_pretrained(model, job["adapter"])
  saved = load_file(f"{job['adapter']}/adapter_model.safetensors")
  built = get_peft_model_state_dict(model, save_embedding_layers=False)
  if set(saved) != set(built) or any(not torch.equal(x, built[k]) for k, x in saved.items()):
    raise SystemExit(f"{job['adapter']}: PEFT did not load the file's adapter tensors as they are")
  with torch.no_grad():
    return model.eval()(tokens).logits.float().numpy()


def main():
  arrays, out_path, kw = parse_args()
  t = {k: torch.from_numpy(v) for k, v in arrays.items()}
  r, alpha = int(kw["r"]), float(kw["alpha"])
  out = {}
  for mode in ("ipm", "kpm"):
    corda(t["w1"], t["w2"], t["x"], r, alpha, mode, out)
  loraga(t["w1"], t["w2"], t["x"], t["y"], r, alpha, out)
  install_bnb_stand_in()
  for k, case in enumerate(json.loads(kw["loftq"])):
    w = t[f"lw{k}"].as_subclass(StaysOnCPU)
    q, a, b = loftq_utils.loftq_init(w, num_bits=case["bits"], reduced_rank=case["r"], num_iter=case["iter"])
    out.update({f"loftq_{k}_Q": plain(q), f"loftq_{k}_A": plain(a), f"loftq_{k}_B": plain(b)})
  for j, job in enumerate(json.loads(kw.get("jobs", "[]"))):
    out[f"logits_{j}"] = load_job(job, t["tokens"].long())
  save(out_path, **out)


if __name__ == "__main__":
  main()
