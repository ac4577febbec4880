# The two commands of the README:
#   make repro   run the DVC pipeline on the built-in sample (creates/refreshes .venv first)
#   make test    run the test suite                           (creates/refreshes .venv first)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export DVC_NO_ANALYTICS := 1

.PHONY: env repro test bench clean-env

env: $(STAMP)

$(STAMP): scripts/install.sh requirements/constraints.txt requirements/base.txt requirements/test.txt pyproject.toml
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
