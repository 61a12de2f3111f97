"""Token ids and loss masks equal to TRL 1.16's own dataset preparation (tests/ref/trl_data.py).

For tiny tokenizers with the special tokens and chat templates of Llama 3, Mistral, Qwen2 (ChatML, no BOS,
a newline after the end-of-turn token, a default system message) and Gemma (end-of-turn not eos), built
by tests/chat_tokenizers.py: SFT (standard and conversational prompt-completion, multi-turn prompts, a
system message, language modeling), DPO (standard and conversational, explicit and implicit prompt) and
KTO (standard and conversational unpaired).
Our examples come from `data.get_dataset` reading the records from JSONL with `format="trl"`.

TRL's SFT labels are the input ids with -100 where no loss is taken; the label of position 0 is never a
target, so weights are compared from position 1. TRL's DPO gives prompt, chosen and rejected ids; each of
our two sequences is prompt + completion with weight 1 on the completion.
"""
import json

import numpy as np
import pytest

import data
from tests import chat_tokenizers, refenv

Q = [{"role": "user", "content": "What color is the sky?"}]
SYS = [{"role": "system", "content": "Answer in one word."}]


def A(text):
  return [{"role": "assistant", "content": text}]


SFT_CASES = {
    "standard": ({"prompt": "The sky is", "completion": " blue."}, {}),
    "standard_text": ({"text": "The sky is blue."}, {}),
    # The prompt's trailing space merges into the completion's first token: the completion starts where
    # the prompt's own tokens stop agreeing with the whole text.
    "standard_boundary": ({"prompt": "The sky is ", "completion": "blue."}, {}),
    "conversational": ({"prompt": Q, "completion": A("It is blue.")}, {}),
    "conversational_system": ({"prompt": SYS + Q, "completion": A("Blue.")}, {}),
    "conversational_multi_turn": ({"prompt": Q + A("It is blue.") + [{"role": "user", "content": "And grass?"}],
                                   "completion": A("It is green.")}, {}),
    "messages_every_token": ({"messages": Q + A("It is blue.")}, {"completion_only_loss": False}),
}
DPO_CASES = {
    "standard": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "standard_implicit": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "standard_boundary": {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},
    "conversational": {"prompt": Q, "chosen": A("It is blue."), "rejected": A("It is green.")},
    "conversational_implicit": {"chosen": Q + A("It is blue."), "rejected": Q + A("It is green.")},
    "conversational_system": {"prompt": SYS + Q, "chosen": A("Blue."), "rejected": A("Green.")},
    "conversational_multi_turn": {"prompt": Q + A("It is blue.") + [{"role": "user", "content": "And grass?"}],
                                  "chosen": A("It is green."), "rejected": A("It is red.")},
}
# ChatML with transformers' {% generation %} markers around each assistant turn's content and its end
# "<|im_end|>\n", which is what assistant_only_loss learns here (TRL masks with transformers' assistant mask).
CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML with a tools block (Qwen2.5's layout, shortened): records carrying `tools` (a list, or JSON text) and
# `chat_template_kwargs` render it, as TRL passes them to the template.
CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if brief %}{{ 'Be brief. ' }}{% endif %}"
    "{{ 'Tools:\n<tools>' }}{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "sky_color", "description": "The sky's color",
                                           "parameters": {"type": "object", "properties": {}}}}]
TOOLS_CASES = {
    "sft": {"prompt": Q, "completion": A("It is blue."), "tools": json.dumps(TOOLS),
            "chat_template_kwargs": {"brief": True}},
    "dpo": {"prompt": Q, "chosen": A("It is blue."), "rejected": A("It is green."), "tools": json.dumps(TOOLS)},
}
MULTI_TURN = Q + A("It is blue.") + [{"role": "user", "content": "And grass?"}] + A("It is green.")
ASSISTANT_CASES = {
    "messages": {"messages": MULTI_TURN},
    "prompt_completion": {"prompt": MULTI_TURN[:-1], "completion": MULTI_TURN[-1:]},
}
KTO_CASES = {
    "standard": {"prompt": "The sky is", "completion": " blue.", "label": True},
    "conversational": {"prompt": Q, "completion": A("It is green."), "label": False},
}
CORPUS = ["The sky is blue. The sky is green. It is blue. It is green. It is red. Blue. Green.",
          "What color is the sky? Answer in one word. And grass?"]
FAMILIES = list(chat_tokenizers.FAMILIES)


def _cases():
  out = [{"trainer": "sft", "record": r, **o} for r, o in SFT_CASES.values()]
  out += [{"trainer": "sft", "record": r, "assistant_only_loss": True, "chat_template": CHATML_GENERATION}
          for r in ASSISTANT_CASES.values()]
  out += [{"trainer": k, "record": r, "chat_template": CHATML_TOOLS} for k, r in TOOLS_CASES.items()]
  out += [{"trainer": "dpo", "record": r} for r in DPO_CASES.values()]
  return out + [{"trainer": "kto", "record": r} for r in KTO_CASES.values()]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("trl_parity")
  return root, {f: chat_tokenizers.make(f, str(root / f), CORPUS) for f in FAMILIES}


@pytest.fixture(scope="module")
def setup(family_dirs):
  if not refenv.available():
    pytest.skip("reference environment (.venv-ref) missing")
  root, dirs = family_dirs
  spec = {"runs": [{"dir": dirs[f], "cases": _cases()} for f in FAMILIES]}
  out = refenv.run("trl_data", {"spec": np.array(json.dumps(spec))})
  results = json.loads(str(out["result"]))
  names = (list(SFT_CASES) + [f"assistant_{k}" for k in ASSISTANT_CASES] + [f"tools_{k}" for k in TOOLS_CASES]
           + [f"dpo_{k}" for k in DPO_CASES] + [f"kto_{k}" for k in KTO_CASES])
  return root, dirs, {f: dict(zip(names, r))
                      for f, r in zip(FAMILIES, results)}


def _ours(root, tok_dir, name, record, **cfg):
  path = root / f"{name}.jsonl"
  data.write_jsonl(path, [record])
  config = {"source": "jsonl", "path": str(path), "tokenizer": tok_dir, "format": "trl", **cfg}
  tok = data.get_tokenizer(config)
  ds = data.get_dataset(config, "train", tokenizer=tok, batch_size=1, seq_len=256, train=False)
  return ds.examples[0]


@pytest.mark.parity
@pytest.mark.parametrize("case", list(SFT_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_matches_trl(setup, family, case):
  root, dirs, ref = setup
  want = ref[family][case]
  record, opts = SFT_CASES[case]
  (root / family).mkdir(exist_ok=True)
  if "error" in want:   # the template refuses the conversation (Gemma and Mistral: no system role)
    with pytest.raises(data.DataError, match="bad_messages"):
      _ours(root / family, dirs[family], case, record, **opts)
    return
  ex = _ours(root / family, dirs[family], case, record, **opts)
  assert list(ex.tokens) == want["input_ids"]
  learned = [int(x != -100) for x in want["labels"]]
  assert list(ex.weights[1:].astype(int)) == learned[1:]


@pytest.mark.parity
@pytest.mark.parametrize("case", list(ASSISTANT_CASES))
def test_assistant_only_loss_matches_trl(setup, case):
  """Every assistant turn and what follows it up to the next turn, as TRL's assistant mask for a
  template whose generation blocks hold exactly that (ChatML, newline after <|im_end|>)."""
  root, dirs, ref = setup
  want = ref["qwen2"][f"assistant_{case}"]
  (root / "qwen2").mkdir(exist_ok=True)
  ex = _ours(root / "qwen2", dirs["qwen2"], f"assistant_{case}", ASSISTANT_CASES[case], assistant_only_loss=True,
             chat_template=CHATML_GENERATION)
  assert list(ex.tokens) == want["input_ids"]
  learned = [int(x != -100) for x in want["labels"]]
  assert list(ex.weights[1:].astype(int)) == learned[1:]
  assert sum(learned) > 0


@pytest.mark.parity
@pytest.mark.parametrize("case", list(TOOLS_CASES))
def test_record_tools_and_template_kwargs_match_trl(setup, case):
  root, dirs, ref = setup
  want = ref["qwen2"][f"tools_{case}"]
  (root / "qwen2").mkdir(exist_ok=True)
  opts = {"pref_kind": "pairwise"} if case == "dpo" else {}
  ex = _ours(root / "qwen2", dirs["qwen2"], f"tools_{case}", TOOLS_CASES[case], chat_template=CHATML_TOOLS, **opts)
  tok = data.load_tokenizer(dirs["qwen2"])
  if case == "sft":
    assert list(ex.tokens) == want["input_ids"]
    assert list(ex.weights[1:].astype(int)) == [int(x != -100) for x in want["labels"]][1:]
    assert "Be brief. Tools:" in tok.decode(ex.tokens)
  else:
    p = want["prompt_ids"]
    for seq, completion in zip(ex.seqs, (want["chosen_ids"], want["rejected_ids"])):
      assert list(seq.tokens) == p + completion
    assert '"name": "sky_color"' in tok.decode(ex.seqs[0].tokens)


@pytest.mark.parity
@pytest.mark.parametrize("case", list(DPO_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_matches_trl(setup, family, case):
  root, dirs, ref = setup
  want = ref[family][f"dpo_{case}"]
  (root / family).mkdir(exist_ok=True)
  if "error" in want:
    with pytest.raises(data.DataError, match="bad_messages"):
      _ours(root / family, dirs[family], f"dpo_{case}", DPO_CASES[case], pref_kind="pairwise")
    return
  ex = _ours(root / family, dirs[family], f"dpo_{case}", DPO_CASES[case], pref_kind="pairwise")
  p = want["prompt_ids"]
  for seq, completion in zip(ex.seqs, (want["chosen_ids"], want["rejected_ids"])):
    assert list(seq.tokens) == p + completion
    assert list(seq.weights.astype(int)) == [0] * len(p) + [1] * len(completion)


@pytest.mark.parity
@pytest.mark.parametrize("case", list(KTO_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_kto_matches_trl(setup, family, case):
  root, dirs, ref = setup
  want = ref[family][f"kto_{case}"]
  (root / family).mkdir(exist_ok=True)
  ex = _ours(root / family, dirs[family], f"kto_{case}", KTO_CASES[case], pref_kind="unpaired", unpaired_kl=False)
  (seq,) = ex.seqs
  p, c = want["prompt_ids"], want["completion_ids"]
  assert list(seq.tokens) == p + c and list(seq.weights.astype(int)) == [0] * len(p) + [1] * len(c)
  assert ex.label == KTO_CASES[case]["label"]


@pytest.mark.parity
def test_families_cover_the_hard_cases(setup):
  """The fixtures are what they claim: no BOS for Qwen2, a newline after its end-of-turn token, Gemma's
  end-of-turn not eos, and BOS never twice where both the post-processor and the template add it."""
  root, dirs, ref = setup
  refused = sorted((f, c) for f, cases in ref.items() for c, r in cases.items() if "error" in r)
  system = ("conversational_system", "dpo_conversational_system")
  assert refused == [(f, c) for f in ("gemma", "mistral") for c in system]
  qwen = data.load_tokenizer(dirs["qwen2"])
  assert qwen.bos_id is None and not data.adds_bos(qwen)
  ids = ref["qwen2"]["conversational"]["input_ids"]
  end = qwen.token_to_id("<|im_end|>")
  assert ids[-2] == end and qwen.decode(ids[-1:]) == "\n"
  assert [int(x != -100) for x in ref["qwen2"]["conversational"]["labels"]][-2:] == [1, 1]
  gemma = data.load_tokenizer(dirs["gemma"])
  assert gemma.token_to_id("<end_of_turn>") in ref["gemma"]["conversational"]["input_ids"]
  assert gemma.eos_id not in ref["gemma"]["conversational"]["input_ids"]
  for family in ("llama3", "mistral", "gemma"):
    tok = data.load_tokenizer(dirs[family])
    assert data.adds_bos(tok)
    for case in ("standard", "conversational"):
      assert ref[family][case]["input_ids"].count(tok.bos_id) == 1


def test_stop_ids_are_eos_and_the_end_of_turn(family_dirs):
  _, dirs = family_dirs
  want = {"llama3": ["<|eot_id|>"], "mistral": ["</s>"], "qwen2": ["<|im_end|>"], "gemma": ["<eos>", "<end_of_turn>"]}
  for family, tokens in want.items():
    tok = data.load_tokenizer(dirs[family])
    assert data.stop_ids(tok) == [tok.token_to_id(t) for t in tokens], family
  assert data.stop_ids(data.CharTokenizer()) == [data.CharTokenizer.eos_id]
