r"""DPO-Kernels (Das et al., 2025): DPO with an embedding-kernel term and a divergence regulariser.

    python main.py --config=configs/sft.py:steps=400 --workdir=/tmp/sft
    python main.py --config=configs/dpo_kernels.py --config.model.init_workdir=/tmp/sft --workdir=/tmp/dpok
    python main.py --config=configs/dpo_kernels.py:kernel=hmk,divergence=js ...    # hierarchical mixture
    python main.py --config=configs/dpo_kernels.py:mode=faithful,source=reference_hidden ...  # the paper's code
    python main.py --config=configs/dpo_kernels.py:mode=faithful,source=frozen_encoder,pool=last \
        --config.loss.encoder_path=/path/to/hf_checkpoint ...       # a frozen embedder, as the paper
    python main.py --config=configs/dpo_kernels.py:select_by=metrics --config.model.init_workdir=/tmp/sft --workdir=/tmp/sel
        # data-driven selection from the data and the starting model, no training (losses/_kernel_selection.py)
    python main.py --config=configs/dpo_kernels.py:select_by=sweep --config.model.init_workdir=/tmp/sft --workdir=/tmp/sel
        # the second selector (`select` is its alias): a short run per kernel x divergence pair, scored held out

`mode=dpo_compatible` (default; ours, not the paper's) is
-log sig(beta[(rho_c - rho_r) + gamma kernel_ratio]) + alpha D(pi||pi_ref); `mode=faithful` reproduces the
reference code's objective (no beta, no log-sigmoid, the reference only in D; unbounded below). The
embeddings come from the policy's own hidden states by default (ours), so the kernel term trains the
policy; `source=frozen_encoder` runs a frozen checkpoint as the paper's embedder.
"""
import ml_collections

from configs import dpo
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", kernel="rbf", divergence="kl", mode="dpo_compatible",
                  source="policy_hidden", pool="mean", steps=300, select=False, select_by="", smoke=False)
  c = dpo.get_config(f"model={arg.model},task={arg.task},steps={arg.steps}" + (",smoke" if arg.smoke else ""))
  c.loss.name = "dpo_kernels"
  c.loss.mode = arg.mode                  # dpo_compatible | faithful
  c.loss.kernel = arg.kernel              # polynomial | rbf | spectral | mahalanobis | hmk
  c.loss.divergence = arg.divergence      # kl | js | hellinger | renyi | bhattacharyya | wasserstein | f
  c.loss.embedding_source = arg.source    # policy_hidden | reference_hidden | frozen_encoder | batch
  c.loss.embedding_pool = arg.pool        # mean (prompt / response positions) | last (last prompt token / eos)
  c.loss.encoder_path = ""                # frozen_encoder: HF checkpoint directory (shares the tokenizer)
  c.loss.embedding_dim = 0                # width of trained kernel parameters; 0 = the embedder's (batch: set it)
  c.loss.gamma = 0.1                      # weight of the kernel log-ratio (dpo_compatible)
  c.loss.kernel_scale = 1.0               # kappa (faithful)
  c.loss.divergence_scale = 0.1           # alpha: weight of D(pi || pi_ref) at the last chosen token
  c.loss.rbf_sigma = 4.0                  # hidden states of the small model have norm ~sqrt(D)
  c.loss.poly_c = 1.0
  c.loss.poly_degree = 2
  c.loss.maha_sigma_inv = "identity"      # identity | learned (Cholesky factor, trained) | path to a [D, D] .npy
  c.loss.maha_eps = 1e-6                  # learned: S = L L^T + eps I
  c.loss.renyi_a = 1.01
  c.loss.wasserstein_k = 32              # top-k support of the Sinkhorn OT
  c.loss.wasserstein_cost = "embedding"   # embedding (distance of input-embedding rows) | discrete (0/1)
  c.loss.wasserstein_epsilon = 0.01       # entropic regulariser, relative to the largest cost on the support
  c.loss.wasserstein_iters = 200          # Sinkhorn iterations
  c.loss.hmk_entropy_coef = 0.0
  # task=sweep (`select`): a short run per kernel x divergence pair, scored on the validation split.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.grid = (("loss.kernel", ("polynomial", "rbf", "spectral", "mahalanobis")),
                  ("loss.divergence", ("kl", "js", "hellinger", "renyi", "bhattacharyya", "wasserstein", "f")))
  c.sweep.steps = 50 if not arg.smoke else 2      # training steps per pair
  c.sweep.metric = "rewards/margins"       # held-out metric to maximise (e.g. exact_match, ranking_accuracy)
  c.sweep.higher_is_better = True
  c.sweep.output_file = "selection.md"
  # task=preselect (`select_by=metrics`): the selection statistics of losses/_kernel_selection.py over
  # the starting model's outputs on `num_batches` training batches; nothing is trained.
  c.selection = ml_collections.ConfigDict()
  c.selection.num_batches = 8 if not arg.smoke else 2
  c.selection.split = "train"
  c.selection.output_file = "preselect"
  select_by = arg.select_by or ("sweep" if arg.select else "")
  if select_by not in ("", "metrics", "sweep"):
    raise ValueError(f"select_by={select_by!r}; valid: metrics, sweep")
  if select_by:
    c.task = {"metrics": "preselect", "sweep": "sweep"}[select_by]
  return c
