# One venv in .venv holds everything; every target sets it up first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup daemon shell test test-fast matrix catalog bench clean

# pip without -q: the first run downloads about 3 GB (torch and its CUDA libraries), shown as it goes
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# timm needs torchvision; these two match and lie on the cluster's wheelhouse/disk
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

daemon: $(STAMP)
	$(BIN)/cachectld

# your shell, with .venv's cachectl and cachectld first on the PATH (what . .venv/bin/activate does)
shell: $(STAMP)
	@echo "cachectl and cachectld of $(CURDIR)/$(VENV) are on the PATH; exit to leave"
	@VIRTUAL_ENV="$(CURDIR)/$(VENV)" PATH="$(CURDIR)/$(BIN):$$PATH" $${SHELL:-/bin/sh}

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
