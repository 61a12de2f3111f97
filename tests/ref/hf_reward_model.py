"""Tiny random Hugging Face sequence-classification (reward) models and their scores (runs in .venv-ref).

    hf_reward_model.py IN.npz OUT.npz --root=DIR --names=llama,qwen2 --pads=2,0   make, save, score
    hf_reward_model.py IN.npz OUT.npz --load=DIR                                  score a saved model

IN: tokens [B, T] int (right-padded with each model's pad id where rows are shorter). OUT: `scores_<name>` [B]
(num_labels=1), what transformers' `*ForSequenceClassification` returns: the score head at the last token
that is not `pad_token_id`.
"""
import torch
import transformers

from _common import parse_args, save
from hf_make_model import randomize

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, num_labels=1)
SPECS = {
    "llama": ("LlamaConfig", dict(attention_bias=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
}


def make(name, seed, pad):
  cls, kw = SPECS[name]
  config = getattr(transformers, cls)(**{**BASE, **kw}, pad_token_id=pad)
  torch.manual_seed(seed)
  return randomize(transformers.AutoModelForSequenceClassification.from_config(
      config, attn_implementation="eager").float().eval())


def main():
  arrays, out, kw = parse_args()
  tokens = torch.as_tensor(arrays["tokens"]).long()
  if "load" in kw:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(kw["load"]).float().eval()
    with torch.no_grad():
      save(out, scores=model(tokens).logits[:, 0].numpy())
    return
  results = {}
  pads = [int(p) for p in kw["pads"].split(",")]
  for seed, (name, pad) in enumerate(zip(kw["names"].split(","), pads)):
    model = make(name, seed, pad)
    model.save_pretrained(f"{kw['root']}/{name}")
    with torch.no_grad():
      results[f"scores_{name}"] = model(tokens).logits[:, 0].numpy()
  save(out, **results)


if __name__ == "__main__":
  main()
