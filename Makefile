# make test: create .venv if missing, install pinned requirements, run the test suite (CPU, offline).
# make demo: the same setup, then the demo job (options: make demo DEMO_ARGS='--seed 4', see scripts/demo.py --help).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt
	touch $(STAMP)

test: install
	$(VENV)/bin/python -m pytest -q tests

demo: install
	$(VENV)/bin/python scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs
