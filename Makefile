# The two commands of the README:
#   make repro   run the DVC pipeline on the built-in sample (creates/refreshes .venv first)
#   make test    run the test suite                           (creates/refreshes .venv first)
#   make bench   run the benchmarks in bench/ (figures printed, nothing asserted)
#   make lint    ruff: the formatter's check and the lint rules of pyproject.toml [tool.ruff] (CI runs it)
#   make lock    regenerate the hash-locked requirements (requirements/lock-*.txt) after changing a requirement
#   make check-install   install the locks as a user would (public registry only) under Python 3.12 and 3.13 in
#                temporary venvs and run smoke stages there (CI runs it; PYTHONS="3.11 3.12" picks others)
# Every installed file is checked against the lock's sha256 hashes (README, "Install"). The torch build is chosen
# by scripts/install.sh and named in its last line (the venv's; else CUDA where nvidia-smi sees a GPU; else PyTorch's
# CPU build where a locked file of it is reachable; else the registry's build, which runs on a CPU too);
# `make env TORCH=cpu` or `TORCH=cuda` forces one. PYTHON=python3.12 picks the interpreter of a new .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TORCH ?=
PYTHON ?= python3
PYTHONS ?= 3.12 3.13
export DVC_NO_ANALYTICS := 1

.PHONY: env lock repro test lint format bench check-install clean-env

env: $(STAMP)

$(STAMP): scripts/install.sh scripts/lockfile.py scripts/upstream_manifest.py pyproject.toml \
          $(wildcard requirements/*.txt requirements/*.in requirements/upstream/*.txt)
	PYTHON=$(PYTHON) bash scripts/install.sh $(if $(TORCH),--torch $(TORCH)) $(VENV)
	touch $(STAMP)

check-install:
	bash scripts/check_install.sh $(PYTHONS)

# Resolves requirements/lock.in + pyproject.toml again (needs the registry; ~3.5 min); review the diff, commit.
lock:
	bash scripts/lock.sh

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The folders with our Python code; `make format` applies what `make lint` checks for.
LINTED := picosam_pipeline stages tests bench scripts

lint: $(STAMP)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

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
