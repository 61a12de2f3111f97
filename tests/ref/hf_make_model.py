"""Makes tiny random Hugging Face causal LMs and their logits (runs in .venv-ref).

    hf_make_model.py IN.npz OUT.npz --root=DIR --names=llama,gemma,...

IN: tokens [B, T] int. For each name, `save_pretrained` writes DIR/<name> (safetensors; `*_sharded` with a
small max_shard_size, `*_bf16` in bfloat16) and OUT gets `logits_<name>` [B, T, V] float32 of the saved
weights (for bf16, the bf16 weights run in float32). Every weight is random and away from its init value
(norm scales, biases included) so that a wrong formula on our side shows in the logits.
"""
import copy

import torch
import transformers

from _common import parse_args, save

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def rope(rope_type="default", theta=10_000.0, **kw):
  return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **kw}}


SPECS = {
    # Llama 2 shape with every bias on (attention_bias biases q, k, v and o; mlp_bias the MLP).
    "llama": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, **rope())),
    "llama_linear": ("LlamaConfig", dict(**rope("linear", 5_000.0, factor=2.5))),
    # Llama 3.1 scaling; original_max_position_embeddings small so low, medium and high bands all occur
    # among the frequencies of hd=16 and matter at 12 positions.
    "llama3": ("LlamaConfig", dict(**rope("llama3", 10_000.0, factor=4.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(sliding_window=16, head_dim=16, **rope(theta=1e6))),
    "mistral_sw": ("MistralConfig", dict(sliding_window=5, head_dim=16, **rope())),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False, **rope(theta=1e6))),
    "gemma": ("GemmaConfig", dict(head_dim=24, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                                  **rope())),
}


def make(name, seed):
  base = name.split("_sharded")[0].split("_bf16")[0]
  cls, kw = SPECS[base]
  config = getattr(transformers, cls)(**{**BASE, **kw})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
  return randomize(model, norm_center=0.0 if base == "gemma" else 1.0)


def randomize(model, norm_center=1.0):
  """Every weight random and away from its init value (norm scales around `norm_center`, biases too)."""
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(norm_center + 0.3 * torch.randn_like(p))
      elif pname.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def main():
  arrays, out, kw = parse_args()
  tokens = torch.as_tensor(arrays["tokens"]).long()
  results = {}
  for seed, name in enumerate(kw["names"].split(",")):
    model = make(name, seed)
    path = f"{kw['root']}/{name}"
    if name.endswith("_bf16"):
      # Round the weights only: casting the module would also round its RoPE inverse-frequency buffer.
      with torch.no_grad():
        for p in model.parameters():
          p.copy_(p.bfloat16().float())
      copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    elif name.endswith("_sharded"):
      model.save_pretrained(path, max_shard_size="40KB")
    else:
      model.save_pretrained(path)
    with torch.no_grad():
      results[f"logits_{name}"] = model(tokens).logits.float().numpy()
  save(out, **results)


if __name__ == "__main__":
  main()
