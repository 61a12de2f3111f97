"""Layer sampling with per-block optimizer state (`sampling.state=persist`, OwLore's torch behaviour) and
OwLore with LoRA on the sampled blocks (`sampling.use_lora`).

With K = 5 steps between draws and GaLore's update_proj_gap = 7 > K, a block's projector must refresh when
*its own* step count is a multiple of 7 (it counts only the steps the block was sampled), never merely
because it was drawn again; a block drawn again must find its moments, projector and count exactly as it
left them.
"""
import jax
import numpy as np

import peft
from configs import owlore as owlore_config
from optim import _sampling as sampling
from tests.test_sampling import _batch, _init, _model, _setup, _weights

L, K, GAP = 4, 5, 7


def _config(**kw):
  config = owlore_config.get_config("model=tiny,smoke" + "".join(f",{k}={v}" for k, v in kw.items()))
  config.sampling.method = "lisa"            # uniform draws: no calibration needed here
  config.sampling.prob_mode = "uniform"
  config.sampling.gamma = 2
  config.sampling.interval_steps = K
  config.optim.grad_clip_norm = 0.0
  return config


def _store(opt_state):
  nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=sampling._is_per_block) if sampling._is_per_block(x)]
  assert len(nodes) == 1
  return nodes[0]


def _rows(store, b):
  return [np.asarray(x[b]) for x in jax.tree.leaves(jax.device_get(store.blocks))]


def test_persistent_state_follows_each_block_across_draws():
  config = _config()
  config.optim.galore.rank = 4
  config.optim.galore.update_proj_gap = GAP
  model = _model(L=L)
  hook, tx, step, state, frozen = _setup(config, model)
  galore_state = lambda st: _store(st.opt_state).blocks[0]
  q_proj = lambda st: np.asarray(peft.flatten(galore_state(st).projector)["layers/attn/q_proj/kernel/slots"])
  assert galore_state(state).count.shape == (L,) and q_proj(state).shape == (L, 64, 4)

  own = np.zeros(L, int)                     # steps each block has been trained, as torch's state["step"]
  dropped = {}                               # block -> its state rows when it left the slots
  refreshed_at, idx = [], np.array([], int)
  for s in range(4 * K):
    if s % K == 0:
      old_idx, old_store = idx, _store(state.opt_state)
      state, frozen = hook.refresh(s, state, frozen, tx)
      idx = peft.sampled_blocks(frozen)
      np.testing.assert_array_equal(idx, sampling.draw(config.seed, s, np.full(L, 1 / L), 2))
      np.testing.assert_array_equal(_store(state.opt_state).idx, idx)
      for b in np.setdiff1d(old_idx, idx):
        dropped[int(b)] = _rows(old_store, b)
      for b in idx:
        if int(b) in dropped:                # drawn again: exactly the state it left with
          for got, want in zip(_rows(_store(state.opt_state), b), dropped.pop(int(b))):
            np.testing.assert_array_equal(got, want)
    before, count_before = q_proj(state), np.asarray(galore_state(state).count)
    np.testing.assert_array_equal(count_before, own)
    state, _ = step(state, frozen, None, _batch(seed=s))
    after = q_proj(state)
    for b in range(L):
      changed = not np.array_equal(after[b], before[b])
      if b not in idx:
        assert not changed, (s, b)           # an unsampled block's state does not move
      else:
        assert changed == (own[b] % GAP == 0), (s, b, own[b])   # refresh on the block's own count
        if changed:
          refreshed_at.append((s, b, own[b]))
        own[b] += 1
  # Refreshes happened mid-draw on a block's own count (7, 14, ...), and draws of a block already trained
  # did not refresh it.
  assert any(c > 0 and s % K != 0 for s, _, c in refreshed_at), refreshed_at
  assert own.sum() == 2 * 4 * K and own.max() > K


def test_persist_and_reset_differ_only_after_a_block_is_drawn_again():
  """The first draw trains identically in both modes; the second draw starts from kept state in one and
  from fresh state in the other."""
  model = _model(L=L)
  runs = {}
  for mode in ("persist", "reset"):
    config = _config()
    config.sampling.state = mode
    config.optim.galore.update_proj_gap = GAP
    hook, tx, step, state, frozen = _setup(config, model)
    ws = []
    for s in range(2 * K):
      if s % K == 0:
        state, frozen = hook.refresh(s, state, frozen, tx)
      state, _ = step(state, frozen, None, _batch(seed=s))
      ws.append(_weights(state, frozen))
    runs[mode] = ws
  np.testing.assert_allclose(runs["persist"][K - 1]["layers"]["attn"]["q_proj"]["kernel"],
                             runs["reset"][K - 1]["layers"]["attn"]["q_proj"]["kernel"], rtol=1e-6, atol=1e-7)
  again = set(sampling.draw(0, 0, np.full(L, 1 / L), 2)) & set(sampling.draw(0, K, np.full(L, 1 / L), 2))
  assert again                               # seed 0 draws a block twice in a row
  b = sorted(again)[0]
  diff = np.abs(runs["persist"][-1]["layers"]["attn"]["q_proj"]["kernel"][b]
                - runs["reset"][-1]["layers"]["attn"]["q_proj"]["kernel"][b]).max()
  assert diff > 1e-5


def test_owlore_lora_trains_only_the_sampled_blocks_adapters():
  config = _config(lora=True)
  config.optim.warmup_steps = 0
  model = _model(L=L)
  params = peft.apply_config(_init(model), config.peft, rng=jax.random.PRNGKey(2))
  hook = sampling.sampling_hook(config, model)
  assert hook.init_params(params, None) is params      # adapters stay whole: no slot nodes
  hook, tx, step, state, frozen = _setup(config, model, params=params)
  trainable = peft.flatten(state.params)
  assert trainable and all(p.startswith("layers/") and p.split("/")[-1] in ("a", "b") for p in trainable)
  state, frozen = hook.refresh(0, state, frozen, tx)
  idx = np.asarray(_store(state.opt_state).idx)
  others = np.setdiff1d(np.arange(L), idx)
  before = jax.device_get(peft.flatten(state.params))
  frozen_before = jax.device_get(frozen)
  for s in range(2):                          # B = 0 at init: A first moves at the second step
    state, _ = step(state, frozen, None, _batch(seed=s))
  after = jax.device_get(peft.flatten(state.params))
  for path, w in after.items():
    np.testing.assert_array_equal(w[others], before[path][others], err_msg=path)
    assert np.all(np.abs(w[idx] - before[path][idx]).reshape(len(idx), -1).max(-1) > 0), path
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)
  counts = [np.asarray(x) for p, x in peft.flatten(_store(state.opt_state).blocks).items() if p.endswith("count")]
  assert counts and all(list(c[idx]) == [2, 2] and not c[others].any() for c in counts)


# ---------------------------------------------------------------------------------------------------------
# Calibration set and the paper preset
# ---------------------------------------------------------------------------------------------------------
def test_calibration_rows_come_from_the_calibration_data_and_count():
  import data as data_lib
  config = owlore_config.get_config("model=tiny,smoke")
  assert config.data.task == "reverse"
  config.sampling.calibration_data.task = "add"           # any config.data source; unset keys: training data
  config.sampling.calibration_sequences, config.sampling.calibration_seq_len = 5, 48
  config.sampling.calibration_batch_size = 2
  sc = sampling.SamplingConfig.from_config(config, L)
  batches = sampling.calibration_batches(config, sc)
  assert [b["inputs"].shape for b in batches] == [(2, 48), (2, 48), (1, 48)]

  def first_rows(task):
    cfg = sampling.calibration_data_config(config, sc)
    cfg.task = task
    it = iter(data_lib.get_dataset(cfg, "train", tokenizer=data_lib.get_tokenizer(cfg), batch_size=2, seq_len=48,
                                   seed=config.seed + 5, train=True))
    return np.asarray(next(it)["inputs"])
  np.testing.assert_array_equal(batches[0]["inputs"], first_rows("add"))
  assert not np.array_equal(batches[0]["inputs"], first_rows("reverse"))
  assert sc.outlier_M == 13.0 and sampling.SamplingConfig("owlore").outlier_M == 13.0


def test_paper_preset_builds_on_a_small_model():
  config = owlore_config.get_config("preset=paper,model=tiny")
  assert (config.batch_size, config.seq_len, config.model.remat, config.model.param_dtype) == (16, 512, "full",
                                                                                              "bfloat16")
  assert config.sampling.state == "persist" and config.optim.learning_rate == 3e-4
  model = _model(L=L)
  hook = sampling.sampling_hook(config, model)
  assert hook.every == 50
  import optim
  optim.check_config(config)
  trainable = peft.split(peft.sample_layers(_init(model), np.arange(config.sampling.gamma)))[0]
  tx, _ = optim.from_config(config, trainable)
  assert _store(jax.eval_shape(tx.init, trainable)).blocks[0].count.shape == (L,)
