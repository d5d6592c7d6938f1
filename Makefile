# The reader's commands. `make book` builds the HTML; `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PY    := .venv/bin/python
UV     = $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTHON ?= python3

.PHONY: help setup data book student test lint clean

help:
	@echo "make book     build the book into _build/html (installs everything it needs)"
	@echo "make test     run the bnlib tests and execute every chapter with nbval"
	@echo "make student  build the student edition (no solutions) into _build/student/_build/html"
	@echo "make data     provision MNIST into data/MNIST/raw"
	@echo "make setup    create .venv from uv.lock (bootstraps uv with pip when missing)"
	@echo "make clean    remove _build/"

# uv reads pyproject.toml + uv.lock; it does not read pip's config, so it installs PyPI's torch/torchvision pair.
setup: .venv/.synced
.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || \
	    (echo "Bootstrapping uv with pip"; $(PYTHON) -m pip install --quiet uv)
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

data: setup
	$(PY) -m bnlib data

book: setup data
	$(PY) tools/build_book.py

student: setup data
	$(PY) tools/build_book.py --student

test: setup data
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf _build
