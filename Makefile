# FluidMoE: `make setup`, then `make test`. `make help` lists every target.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

# Python 3.12 (Megatron requires it); found by tools/find-python.sh unless PYTHON= is given.
PYTHON ?=
VENV := .venv
VPY := $(VENV)/bin/python
# A Megatron-LM mirror to clone the submodule from (path or URL); default: .gitmodules' URL.
MEGATRON_LM_URL ?=
# A failed submodule clone is remembered (.build/submodule-clone-failed.json) and not retried
# from the same URL; RETRY_SUBMODULE=1 retries it.
RETRY_SUBMODULE ?=
# Pins. The GPU hosts run torch 2.11 (cu130). The Megatron pin (commit, tag, megatron-core
# version) has one source, patches/upstream.lock; the megatron-core requirement is read from it.
TORCH_VERSION ?= 2.11.0
LOCK := patches/upstream.lock
MCORE_VERSION := $(shell awk '$$1 == "megatron-core" {print $$2}' $(LOCK) 2>/dev/null)
REQS := torch==$(TORCH_VERSION) megatron-core==$(MCORE_VERSION) numpy packaging six regex pyyaml \
        pydantic einops psutil pytest setuptools wheel matplotlib
# First recipe line of every target that runs the venv: without a complete `make setup` it
# stops with one message (what is missing) instead of a shell or import error.
define NEED_SETUP
@why=; \
if [ ! -x $(VPY) ]; then why="no $(VPY)"; \
elif [ ! -f $(VENV)/.fluid-deps ]; then why="the dependencies are not installed"; \
elif [ ! -f .build/setup-state.json ]; then why="Megatron is not set up"; \
elif ! $(VPY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("fluid") is None)' \
     2>/dev/null; then why="the fluid overlay is not installed"; fi; \
if [ -n "$$why" ]; then echo "make $@: run 'make setup' first ($$why)" >&2; exit 1; fi
endef
PYTEST_ARGS ?=
REF ?=
FROM ?=
TO ?=
NPROC ?= $(shell python3 -c 'import os;print(os.environ.get("NPROC") or "")' 2>/dev/null)

.PHONY: help setup venv deps megatron overlay status test test-cpu test-dist test-gpu \
        check-patches refresh-patches rebase-upstream diff-report upstream-report train bench clean \
        print-reqs lint

help:
	@echo "make setup            venv (Python 3.12), pinned torch + megatron-core, Megatron-LM submodule"
	@echo "                      (or core-only from the package index), patch series, fluid overlay"
	@echo "                      options: PYTHON=/path/python3.12 MEGATRON_LM_URL=<mirror>"
	@echo "                      RETRY_SUBMODULE=1 (clone again after a failed clone)"
	@echo "make test             pytest over tests/ (cpu, dist, gpu tiers; gpu skips without CUDA)"
	@echo "make check-patches    series/files/headers/lock consistent, applies with no fuzz, refresh no-op"
	@echo "make refresh-patches  rewrite patches/*.patch from the applied submodule"
	@echo "make rebase-upstream REF=<tag|commit|branch>   move the pin, re-apply, re-lock, API check"
	@echo "make diff-report [FROM=<pin>] [TO=<ref>]       upstream diff + API report (markdown)"
	@echo "make upstream-report  CI's report: pin vs newest megatron-core on the package index"
	@echo "make train            small Mixtral-like model, stock pretrain_gpt.py --use-fluid-moe, all local GPUs"
	@echo "make lint             ruff check + ruff format --check (overlay/fluid tools tests benchmarks"
	@echo "                      examples), mypy basic (overlay/fluid tools); installs the pinned tools"
	@echo "make status           fluid.print_status()"
	@echo "make print-reqs       the requirements make setup installs (megatron-core from $(LOCK))"

setup: venv deps megatron overlay status

venv:
	@py=$$(PYTHON="$(PYTHON)" tools/find-python.sh) || exit 1; \
	if [ -x $(VPY) ] && ! $(VPY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	  echo "setup: $(VENV) is not Python 3.12; recreating"; rm -rf $(VENV); fi; \
	if [ ! -x $(VPY) ]; then echo "setup: creating $(VENV) with $$py"; "$$py" -m venv $(VENV); fi

print-reqs:
	@test -n "$(MCORE_VERSION)" || { echo "$(LOCK) has no 'megatron-core <version>' line" >&2; exit 1; }
	@echo $(REQS)

# Re-installed only when the pins change (the stamp records them).
deps: venv
	@test -n "$(MCORE_VERSION)" || { echo "setup: $(LOCK) has no 'megatron-core <version>' line" >&2; exit 1; }
	@want="$(REQS)"; stamp=$(VENV)/.fluid-deps; \
	if [ -f $$stamp ] && [ "$$(cat $$stamp)" = "$$want" ]; then echo "setup: dependencies up to date"; \
	else echo "setup: installing $$want"; \
	  $(VPY) -m pip install -q --disable-pip-version-check $$want 2>&1 | { grep -v "^WARNING: Location" || true; } ; \
	  $(VPY) -W ignore -c 'import torch, megatron.core' 2>/dev/null && echo "$$want" > $$stamp; fi
	@test -f $(VENV)/.fluid-deps || { echo "setup: dependency install failed" >&2; exit 1; }

megatron: deps
	@MEGATRON_LM_URL="$(MEGATRON_LM_URL)" $(VPY) tools/setup_megatron.py \
	  $(if $(filter 1 yes true,$(RETRY_SUBMODULE)),--retry-submodule)

overlay: deps
	@# Reinstalled when missing, not the editable install of overlay/, or when its entry points
	@# differ from overlay/pyproject.toml's (a pull that adds a hook must install it).
	@if ! $(VPY) -c 'import importlib.metadata as m, sys, tomllib; d = m.distribution("fluidmoe"); \
	  want = {(g, n, v) for g, e in tomllib.load(open("overlay/pyproject.toml", "rb"))["project"]["entry-points"].items() for n, v in e.items()}; \
	  have = {(e.group, e.name, e.value) for e in d.entry_points}; \
	  sys.exit(0 if "overlay" in (d.read_text("direct_url.json") or "") and want == have else 1)' 2>/dev/null; then \
	  echo "setup: installing the fluid overlay (editable)"; \
	  $(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e overlay \
	    2>&1 | { grep -v "^WARNING: Location" || true; }; \
	else echo "setup: fluid overlay already installed (editable)"; fi

status:
	$(NEED_SETUP)
	@$(VPY) -W ignore -c 'import fluid; fluid.print_status()'

# Lint: pinned tools, installed into the venv by this target when missing or at another version
# (not part of `make setup`'s stamp, so changing them never reinstalls torch). Config: ruff.toml,
# mypy.ini. Every path below is checked; nothing is skipped.
RUFF_VERSION := 0.17.5
MYPY_VERSION := 2.4.1
LINT_PATHS := overlay/fluid tools tests benchmarks examples
TYPE_PATHS := overlay/fluid tools
lint:
	$(NEED_SETUP)
	@if ! $(VENV)/bin/ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || \
	  ! $(VENV)/bin/mypy --version 2>/dev/null | grep -q "^mypy $(MYPY_VERSION) "; then \
	  echo "lint: installing ruff==$(RUFF_VERSION) mypy==$(MYPY_VERSION)"; \
	  $(VPY) -m pip install -q --disable-pip-version-check ruff==$(RUFF_VERSION) mypy==$(MYPY_VERSION) \
	    2>&1 | { grep -v "^WARNING: Location" || true; }; fi
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(TYPE_PATHS)

test:
	$(NEED_SETUP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

test-cpu:
	$(NEED_SETUP)
	$(VPY) -m pytest tests/cpu $(PYTEST_ARGS)

test-dist:
	$(NEED_SETUP)
	$(VPY) -m pytest tests/dist $(PYTEST_ARGS)

test-gpu:
	$(NEED_SETUP)
	$(VPY) -m pytest tests/gpu $(PYTEST_ARGS)

# check-patches runs against a pristine tree: the pinned commit of the submodule (git archive of
# the touched files) in full mode, the package-index core in core-only mode.
check-patches:
	$(NEED_SETUP)
	@$(VPY) tools/check_patches.py

refresh-patches:
	$(NEED_SETUP)
	@test -d Megatron-LM/megatron/core || { echo "refresh-patches needs the Megatron-LM submodule (make setup MEGATRON_LM_URL=...)" >&2; exit 1; }
	$(VPY) tools/patches.py refresh --tree Megatron-LM

rebase-upstream:
	@test -n "$(REF)" || { echo "usage: make rebase-upstream REF=<tag|commit|branch> [MEGATRON_LM_URL=...]" >&2; exit 2; }
	$(NEED_SETUP)
	$(VPY) tools/rebase_upstream.py --ref "$(REF)" $(if $(MEGATRON_LM_URL),--url "$(MEGATRON_LM_URL)")

diff-report:
	$(NEED_SETUP)
	$(VPY) tools/diff_report.py $(if $(FROM),--from "$(FROM)") $(if $(TO),--to "$(TO)") --out out/diff-report.md

upstream-report:
	bash ci/upstream_report.sh

train:
	$(NEED_SETUP)
	@$(VPY) tools/train.py $(if $(NPROC),--nproc $(NPROC))

# Benchmark recipes (benchmarks/recipes.py): `make bench RECIPE="moe_mixtral_ep2 e2e_mixtral_ep2"` on a GPU
# host (after `source benchmarks/gpu_env.sh`), `make bench` lists them; BENCH_ARGS=--dry-run runs them on CPU.
RECIPE ?=
BENCH_ARGS ?=
BENCH_PY = $(if $(wildcard $(VPY)),$(VPY),python3)
bench:
	@if [ -z "$(RECIPE)" ]; then $(BENCH_PY) -m benchmarks.run --list; \
	else $(BENCH_PY) -m benchmarks.run $(RECIPE) $(BENCH_ARGS); fi

clean:
	rm -rf .build out .pytest_cache
