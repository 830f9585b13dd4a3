# One venv in .venv holds everything; every target sets it up first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup daemon test test-fast matrix catalog bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# timm needs torchvision; these two match and lie on the cluster's wheelhouse/disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

daemon: $(STAMP)
	$(BIN)/cachectld

test: $(STAMP)
	$(BIN)/python -m pytest -q

# no timm release installed or run, no converting daemon: under two minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not matrix'

matrix: $(STAMP)
	$(BIN)/python -m tools.matrix

catalog: $(STAMP)
	$(BIN)/python -m tools.build_catalog

clean:
	rm -rf $(VENV) .cache build

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench
