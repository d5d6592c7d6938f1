# The reader's commands. `make book` builds the HTML; `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PY    := .venv/bin/python
UV     = $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTHON ?= python3
# Another CPU code path on this machine: torch's portable (non-vector) kernels, MKL and oneDNN capped at AVX2,
# OpenBLAS's Haswell kernels. `make test` runs nbval on it, so outputs committed on one path are compared with
# an execution on another (CONTRIBUTING.md, "Portable outputs"). `make book CPU=other` builds on it too.
OTHER_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
CPU ?= native
BOOK_ENV := $(if $(filter other,$(CPU)),$(OTHER_CPU),)

.PHONY: help setup data book student test clean

help:
	@echo "make book     build the book into _build/html (installs everything it needs)"
	@echo "make test     run the bnlib tests and execute every chapter with nbval (on another CPU code path)"
	@echo "              CPU=other: also build the book (make book / the browser test) on that code path"
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
	env $(BOOK_ENV) $(PY) tools/build_book.py

student: setup data
	$(PY) tools/build_book.py --student

test: setup data
	env $(OTHER_CPU) BNLIB_BOOK_CPU=$(CPU) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf _build
