"""HF `peft` side of tests/test_adapters_randlora.py (runs in .venv-ref), in one call.

    peft_randlora.py IN.npz OUT.npz --root=DIR --layers=JSON --loads=JSON --makes=JSON

Same cases as peft_family_a.py (layers: a chain of nn.Linear with its RandLoRA tensors set from IN
`<name>__t__<key>`, OUT `<name>__y` / `<name>__ym` unmerged / merged; loads: our export through
PeftModel.from_pretrained; makes: get_peft_model + seeded noise + save_pretrained), for PEFT's RandLoraConfig.
The basis buffers (`randlora_A` [r, 1, m], `randlora_B` [M, N, r]) are bfloat16 in PEFT: the values given
must be bfloat16-exact, which the script checks.
"""
import peft

import peft_family_a as family

family.CONFIGS["RANDLORA"] = peft.RandLoraConfig

if __name__ == "__main__":
  family.main()
