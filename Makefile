# The commands of the README:
#   make repro     run the DVC pipeline on the built-in sample (creates/refreshes .venv first), then print each
#                  stage's headline numbers in one table (picosam-pipeline summary)
#   make test      the fast tests: unit tests and one small end-to-end run, not those marked slow (-m "not slow";
#                  at most 5 min on 2 cores; creates/refreshes .venv first)
#   make test-all  every test, the slow ones too (what CI runs, .ci/run; creates/refreshes .venv first)
#                  PYTEST_ARGS passes options to pytest in both, e.g. PYTEST_ARGS="-x tests/train"
#   make bench   run the benchmarks in bench/ (figures printed, nothing asserted)
#   make lint    ruff: the formatter's check and the lint rules of pyproject.toml [tool.ruff] (CI runs it)
#   make lock    regenerate the hash-locked requirements (requirements/lock-*.txt) after changing a requirement
#   make check-install   install the locks as a user would (public registry only) under Python 3.12 and 3.13 in
#                temporary venvs and run smoke stages there (CI runs it; PYTHONS="3.11 3.12" picks others)
#   make wheelhouse   an offline install kit for a GPU node without internet (docs/gpu.md): the locked packages the
#                node lacks, for its Python and platform, hashes checked, into WHEELHOUSE_OUT (build/wheelhouse);
#                NODE=node.json is `python3 scripts/wheelhouse.py probe` run there; WHEELHOUSE_ARGS="--reuse-node all"
#                etc. On the node: `make env WHEELHOUSE=DIR` (a venv over the node's torch, pip offline)
#   make bench-gpu    every GPU figure of issue 33 in one call, within BUDGET_S seconds (default 540): one table of
#                the device, versions and each figure next to its goal (bench/gpu_suite.py; no CUDA: says so, exits 2)
# Every installed file is checked against the lock's sha256 hashes (docs/install.md). The torch build is chosen
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

.PHONY: env lock repro test test-all lint format bench check-install clean-env

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
	$(VENV)/bin/picosam-pipeline summary

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
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

.PHONY: wheelhouse bench-gpu
WHEELHOUSE_OUT ?= build/wheelhouse
NODE ?=
WHEELHOUSE_ARGS ?=
BUDGET_S ?= 540
GPU_SUITE_OUT ?=

# Needs the registry and this machine's venv (sdists' metadata is read with its setuptools); ~1 min, ~0.4 GB for a node
# with only torch, far less with --reuse-node all on a full container.
wheelhouse: $(STAMP)
	@test -n "$(NODE)" || { echo "make wheelhouse: say which node: NODE=node.json, the output of" \
	    "\`python3 scripts/wheelhouse.py probe\` run on it (docs/gpu.md)" >&2; exit 2; }
	$(PY) scripts/wheelhouse.py build -o $(WHEELHOUSE_OUT) --node $(NODE) $(WHEELHOUSE_ARGS)

# No dependency on the env target: on a node the venv may come from scripts/install.sh --wheelhouse directly.
bench-gpu:
	$(PY) bench/gpu_suite.py --budget-s $(BUDGET_S) $(if $(GPU_SUITE_OUT),--out $(GPU_SUITE_OUT))
