# MammoLab — one door for set-up, running, testing, training and packaging.
# Works on a fresh Debian machine with Python >= 3.11, pip, make and root (or sudo).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Debian packages Qt needs at run time (and Xvfb for a virtual screen).
APT_PACKAGES := libgl1 libegl1 libxkbcommon0 libxkbcommon-x11-0 libglib2.0-0 libfontconfig1 \
                libdbus-1-3 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 \
                libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0 xvfb xauth
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint train replicate bench package system-deps clean help

help:
	@echo "make run      start MammoLab on the bundled model (installs what it needs)"
	@echo "make test     install everything the tests need and run the whole suite headless"
	@echo "make lint     ruff"
	@echo "make train    retrain the bundled models from ../shared/data (about 50-70 min on 2 cores)"
	@echo "make replicate  after make train: the recipe on two more fold splits (about 100 min), their"
	@echo "               figures added to the bundle's model card (the shipped bundle has them)"
	@echo "make bench    speed benchmarks (ratios measured in one run)"
	@echo "make package  build the standalone app with PyInstaller"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.all: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[train,test]"
	touch $@ $(VENV)/.runtime

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: system-deps $(VENV)/.runtime
	@if [ -z "$$DISPLAY" ] && [ -z "$$WAYLAND_DISPLAY" ] && [ -z "$$QT_QPA_PLATFORM" ] && [ "$$(uname)" = Linux ]; then \
	  echo "No display found: run 'xvfb-run -a make run' for a virtual screen, or start MammoLab from a desktop session."; \
	  exit 1; fi
	$(VENV)/bin/mammolab $(ARGS)

test: system-deps $(VENV)/.all
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.all
	$(VENV)/bin/ruff check core models desktop tests packaging

train: $(VENV)/.all
	$(PY) -m models.bundle_recipe --data ../shared/data --out runs/bundled --bundle models/bundled

# The same recipe cross-validated on two other fold splits (no final models), then the bundle
# re-exported from runs/bundled with their figures beside its own.
replicate: $(VENV)/.all
	@test -f runs/bundled/classifier.keras || { echo "make replicate: no runs/bundled; run make train first" >&2; exit 2; }
	for s in 1 2; do \
	  $(PY) -m models.bundle_recipe --data ../shared/data --out runs/replicate-seed$$s --seed $$s --cv-only || exit 1; \
	done
	$(VENV)/bin/mammolab export runs/bundled models/bundled --overwrite \
	  --replicate runs/replicate-seed1 --replicate runs/replicate-seed2

bench: $(VENV)/.all
	$(PY) tests/bench/bench_inference.py
	$(PY) tests/bench/bench_scanner_fit.py

package: system-deps $(VENV)/.all
	$(PIP) install -q -e ".[package]"
	$(VENV)/bin/pyinstaller --noconfirm packaging/mammolab.spec

clean:
	rm -rf build dist .pytest_cache
