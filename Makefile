# The two commands of the README:
#   make repro   run the DVC pipeline on the built-in sample (creates/refreshes .venv first)
#   make test    run the test suite                           (creates/refreshes .venv first)
#   make bench   run the benchmarks in bench/ (figures printed, nothing asserted)
# On a stock machine whose pip would pick a CUDA torch, `make env TORCH_INDEX=cpu` takes the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TORCH_INDEX ?=
export DVC_NO_ANALYTICS := 1

.PHONY: env repro test bench clean-env

env: $(STAMP)

$(STAMP): scripts/install.sh requirements/constraints.txt requirements/base.txt requirements/test.txt pyproject.toml
	bash scripts/install.sh $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX)) $(VENV)
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/logit_storage.py
	$(PY) bench/teacher_logits.py
	$(PY) bench/loader.py
	$(PY) bench/teacher_backends.py
	$(PY) bench/teacher_gpu.py
	$(PY) bench/teacher_sam3.py
	$(PY) bench/train_gpu.py

clean-env:
	rm -rf $(VENV)
