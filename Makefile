# One venv in .venv holds everything; every target sets it up first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup daemon shell test test-fast torture matrix catalog bench clean wheelhouse

# pip without -q: the first run downloads about 3 GB (torch and its CUDA libraries), shown as it goes
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# timm needs torchvision; constraints.txt pins the two, as tested
	$(BIN)/pip install -c constraints.txt torch torchvision
	$(BIN)/pip install -c constraints.txt -e '.[test]'
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
	$(BIN)/python -m pytest -q -m 'not slow and not matrix and not reliability'

# the reliability suite (part of make test) for longer: every case through the installed
# cachectl, TORTURE times the kills and larger inputs; prints its figures at the end
TORTURE ?= 4
torture: $(STAMP)
	CACHECTL_TORTURE=$(TORTURE) $(BIN)/python -m pytest -q -m reliability tests/test_reliability.py

matrix: $(STAMP)
	$(BIN)/python -m tools.matrix

# the shipped catalog's releases: fingerprints they lack; add one with cachectl catalog build VERSION
catalog: $(STAMP)
	CACHECTL_BUILD_DIR=$(CURDIR)/build CACHECTL_TIMM_RELEASES=$(CURDIR)/.cache/timm $(BIN)/cachectl catalog build

# Everything an air-gapped cluster needs, as files: torch as constraints.txt pins it, cachectl
# with its dependencies and pytest, the build backend, and what the tests install beside
# (the catalogued timm releases, the huggingface_hub of timm 0.9's time). Needs an index.
WHEELHOUSE ?= wheelhouse
RELEASES = $(shell $(PY) -c 'from tools.timm_releases import CATALOG_RELEASES as r, UNCATALOGUED as u, UNIMPORTABLE as x; print(*r, u, x)')
wheelhouse:
	@test -n "$(RELEASES)" || { echo "make wheelhouse: cannot read the timm releases from tools/timm_releases.py with $(PY)" >&2; exit 1; }
	$(PY) -m pip download -d $(WHEELHOUSE) -c constraints.txt torch torchvision pip 'setuptools>=77,<85'
	$(PY) -m pip wheel -w $(WHEELHOUSE) -c constraints.txt '.[test]'
	set -e; for v in $(RELEASES); do $(PY) -m pip download -q --no-deps -d $(WHEELHOUSE) timm==$$v; done
	$(PY) -m pip download --no-deps -d $(WHEELHOUSE) huggingface_hub==0.20.3 requests urllib3 idna certifi charset_normalizer
	du -sh $(WHEELHOUSE)

clean:
	rm -rf $(VENV) .cache build

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench
