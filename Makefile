# The two commands of the README:
#   make repro   run the DVC pipeline on the built-in sample (creates/refreshes .venv first)
#   make test    run the test suite                           (creates/refreshes .venv first)
#   make bench   run the benchmarks in bench/ (figures printed, nothing asserted)
#   make lock    regenerate the hash-locked requirements (requirements/lock-*.txt) after changing a requirement
# Every installed file is checked against the lock's sha256 hashes (README, "Install notes"). `make env TORCH=cuda`
# or `TORCH=cpu` picks the torch build (default: the venv's, else cuda where nvidia-smi sees a GPU, else cpu); on a
# CPU machine whose pip finds no CPU torch wheel, `make env TORCH_INDEX=cpu` also searches the PyTorch CPU index.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TORCH_INDEX ?=
TORCH ?=
export DVC_NO_ANALYTICS := 1

.PHONY: env lock repro test bench clean-env

env: $(STAMP)

$(STAMP): scripts/install.sh scripts/lockfile.py scripts/upstream_manifest.py pyproject.toml \
          $(wildcard requirements/*.txt requirements/*.in requirements/upstream/*.txt)
	bash scripts/install.sh $(if $(TORCH),--torch $(TORCH)) $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX)) $(VENV)
	touch $(STAMP)

# Resolves requirements/lock.in + pyproject.toml again (needs the registry; ~3.5 min); review the diff, commit.
lock:
	bash scripts/lock.sh

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
