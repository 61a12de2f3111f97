"""PEFT's EVA (`peft.tuners.lora.eva.get_eva_state_dict`) on two linear layers fed given activations.

Inputs: `x1` [N, B, T, in1], `x2` [N, B, T, in2] (N calibration batches; every token counts). Keywords: r,
rho, tau. Outputs `a1`, `a2`: the EVA state dict's rows (PEFT's lora_A [r_l, in]) of layers l1, l2.
"""
import torch
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.eva import get_eva_state_dict

from _common import parse_args, save


class Two(torch.nn.Module):
  def __init__(self, in1, in2):
    super().__init__()
    self.l1 = torch.nn.Linear(in1, 4, bias=False)
    self.l2 = torch.nn.Linear(in2, 4, bias=False)


def main():
  arrays, out, kw = parse_args()
  torch.manual_seed(0)
  x1, x2 = torch.from_numpy(arrays["x1"]), torch.from_numpy(arrays["x2"])
  model = Two(x1.shape[-1], x2.shape[-1])
  loader = [{"x1": x1[i], "x2": x2[i]} for i in range(x1.shape[0])]
  cfg = LoraConfig(r=int(kw["r"]), target_modules=["l1", "l2"],
                   eva_config=EvaConfig(rho=float(kw["rho"]), tau=float(kw["tau"])))

  def forward(m, inputs):
    m.l1(inputs["x1"])
    m.l2(inputs["x2"])

  sd = get_eva_state_dict(model, loader, cfg, forward_fn=forward, prepare_model_inputs_fn=None,
                          prepare_layer_inputs_fn=None, show_progress_bar=False)
  save(out, a1=sd["l1"].numpy(), a2=sd["l2"].numpy())


if __name__ == "__main__":
  main()
