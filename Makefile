# Two commands for a fresh machine:
#   make demo   creates .venv if missing, then trains a small model from scratch on a built-in task (CPU, offline)
#   make test   creates .venv and the PyTorch reference env .venv-ref if missing, then runs the tests
PY ?= python3
VENV := .venv
REF := .venv-ref
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-chaos env ref-env bench clean

env: $(VENV)/.installed
$(VENV)/.installed: requirements/jax.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/jax.txt
	touch $@

ref-env: $(REF)/.installed
$(REF)/.installed: requirements/ref.txt
	$(PY) -m venv $(REF)
	$(REF)/bin/pip install -q --upgrade pip
	$(REF)/bin/pip install -q -r requirements/ref.txt
	# galore-torch's requirements pull bitsandbytes and a CUDA torch; the parity tests load its modules directly.
	$(REF)/bin/pip install -q --no-deps galore-torch==1.0
	touch $@

# SFT from scratch on the built-in `sort` task, then DPO with LoRA from that model on the built-in preference
# task; each stage prints held-out exact match (and preference metrics) before and after.
demo: env
	rm -rf $(WORKDIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python main.py --config=configs/sft.py:steps=100 --workdir=$(WORKDIR)/sft
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python main.py --config=configs/dpo.py \
	  --config.model.init_workdir=$(WORKDIR)/sft --workdir=$(WORKDIR)/dpo

test: env ref-env
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python -m pytest -n 2 --dist loadfile -q --durations=20 $(PYTEST_ARGS)

# The many-kills chaos test alone (it is also part of `make test`).
test-chaos: env
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python -m pytest -q -m chaos $(PYTEST_ARGS)

# The inner loop: no parity tests (no reference environment needed) and no end-to-end training runs.
test-fast: env
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/python -m pytest -n 2 --dist loadfile -q -m "not parity and not slow" $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/python benchmarks/bench_train.py full_sft

clean:
	rm -rf workdirs
