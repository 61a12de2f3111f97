r"""FRUGAL: LLaMA pre-training on C4 (GaLore's setting), state-full density 0.25, validation perplexity.

    python main.py --config=configs/paper/frugal_c4.py:size=130m --workdir=W --config.data.tokenizer=T5_DIR
    python main.py --config=configs/paper/frugal_c4.py:size=1b --workdir=W --config.dry_run=True

Zmushko et al., *FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training*
(ICML 2025), Table 2 (C4 pre-training, rho = 0.25): 60M / 130M / 350M / 1B perplexities are not confirmed
here (unverified: the code is an anonymised mirror, METHODS.md C3). Settings: density 0.25, update gap 200,
Adam on the state-full blocks, signSGD (inactive_lr_scale 1.0, the pre-training value) on the rest,
whole-tensor blocks (`--optimizer frugal`'s default) in random order; schedule and shapes as GaLore's
(configs/paper/_c4.py). `subspace=svd` gives FRUGAL's GaLore-SVD variant.
"""
from configs.common import parse_arg
from configs.paper import _c4
from configs.paper import _recipe


def get_config(arg=None):
  arg = parse_arg(arg, size="60m", subspace="block")
  c = _c4.c4_config(arg.size, "frugal")
  c.optim.frugal.subspace = arg.subspace
  return _recipe.card(
      c, name=f"frugal_c4:size={arg.size}", paper="FRUGAL (Zmushko et al., ICML 2025)", table="Table 2",
      row=f"LLaMA {arg.size}, FRUGAL rho=0.25", metric="validation perplexity (C4)",
      number="n/a (unverified)", data_file="data/paper/c4/{train,validation}.jsonl",
      record_format='{"text": "..."}', evaluation="held-out loss on ~10M validation tokens",
      command=f"python main.py --config=configs/paper/frugal_c4.py:size={arg.size} --workdir=W",
      follows="METHODS.md C3 defaults (the paper's code is not public on GitHub)")
