# One entry point for people and CI. `make smoke` = set up + the main job; `make test` = the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED ?= ../shared
STANDIN := data/standin/cifar-10-python.tar.gz

# Offline default: when CIFAR10_ARCHIVE is unset and no official archive is at data/, but the offline
# stand-in of ../shared/data exists, build it and use it (every output then says "official": false).
ifeq ($(strip $(CIFAR10_ARCHIVE)),)
ifeq ($(wildcard data/cifar-10-python.tar.gz),)
ifneq ($(wildcard $(SHARED)/data/cifar10-jpeg-standin.tar.gz),)
export CIFAR10_ARCHIVE := $(abspath $(STANDIN))
NEED_STANDIN := $(STANDIN)
endif
endif
endif

# Pipeline commands run with the .venv first on PATH (python, dvc, papermill, jupyter).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup results smoke cpu paper test test-fast bench gpu-check wheelhouse params lock clean clean-all standin
help:
	@echo "make results  set up .venv and rebuild every table, figure and notebook from the published results/cpu (minutes, no data)"
	@echo "make smoke    set up .venv and run the main job: the smoke profile end to end (minutes, CPU)"
	@echo "make cpu      the cpu profile: a reduced reproduction of C1-C7, published to results/cpu (~75 min, 2 cores)"
	@echo "make paper    the paper profile (dvc repro at the root; needs a GPU, days of compute)"
	@echo "make test     run the test suite (what CI runs)"
	@echo "make bench    time training steps against a plain baseline (repeated; writes reports/bench.json)"
	@echo "make gpu-check  everything that needs CUDA in <= 8 min, report in $(GPU_CHECK_OUT)/ (docs/gpu.md)"
	@echo "make wheelhouse  the pinned wheels an offline GPU machine with its own torch needs (WHEEL_PYTHON=3.12)"
	@echo "make standin  build the offline CIFAR-10 stand-in from $(SHARED)/data (not official data)"
	@echo "make params   write every setting a profile's params.yaml leaves to a code default into it (comments kept)"
	@echo "make lock     rewrite requirements.lock from the current .venv"
	@echo "make clean    remove outputs of the pipeline (keeps .venv and data/)"

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): requirements.lock pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The reviewer's path: everything shown in results/cpu rebuilt from the bundle alone (packed models, metrics,
# verdicts); no training, no dataset. Output: reports/results-cpu/ (notebooks/, figures/, tables/).
results: $(STAMP)
	$(PY) -m paper_repro report --bundle results/cpu --out reports/results-cpu
	@echo "rebuilt from results/cpu: reports/results-cpu/ (compare with the committed results/cpu/)"

standin: $(STANDIN)
$(STANDIN): | $(STAMP)
	mkdir -p $(dir $(STANDIN))
	$(PY) $(SHARED)/data/make_cifar10_standin.py $(STANDIN).tmp && mv $(STANDIN).tmp $(STANDIN)

# repro DIR: re-prepare when the chosen archive changed (DVC cannot see $$CIFAR10_ARCHIVE), then dvc repro.
define repro
	cd $(1) && { python -m paper_repro prepare --stale-check || dvc repro --force --single-item prepare; } && dvc repro
endef

smoke: $(STAMP) $(NEED_STANDIN)
	$(call repro,profiles/smoke)
	@echo "smoke profile done: profiles/smoke/reports/ (notebooks/*.html, figures/, tables/, verification.md)"

# cpu: the trainings and evaluations run as parallel jobs (grid, then dvc commit), then dvc repro runs
# verify and report, publish writes the committed bundle results/cpu/ and the README's results block.
cpu: $(STAMP) $(NEED_STANDIN)
	mkdir -p profiles/cpu/logs && echo "{\"started\": $$(date +%s)}" > profiles/cpu/logs/timing.json
	cd profiles/cpu && { python -m paper_repro prepare --stale-check || dvc repro --force --single-item prepare; } && \
	  dvc repro --single-item prepare && python -m paper_repro grid -j 2 && dvc repro && \
	  python -m paper_repro publish --timing logs/timing.json
	python -m paper_repro publish --readme README.md --bundle results/cpu
	@echo "cpu profile done: results/cpu/ (committed bundle), profiles/cpu/reports/ (everything)"

paper: $(STAMP) $(NEED_STANDIN)
	$(call repro,.)
	@echo "paper profile done: reports/"

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) -m paper_repro bench --json reports/bench.json --stacked 2 4

# The prepared GPU check (docs/gpu.md): versions, CUDA-only tests, bench, a short gpu-profile training on the
# full-size data, the paper columns' time; each part under its own timeout, report even when a part fails.
GPU_CHECK_OUT ?= reports/gpu-check
gpu-check: $(STAMP) $(NEED_STANDIN)
	$(PY) -m paper_repro gpu-check --out $(GPU_CHECK_OUT) --budget-s 480

# For a GPU machine without network that has its own torch: the pinned wheels it lacks, for its Python
# (docs/gpu.md section 1). E.g. make wheelhouse WHEEL_ARGS="--for dvclive pyyaml --have numpy pandas".
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
wheelhouse: $(STAMP)
	$(PY) -m paper_repro wheelhouse --out $(WHEELHOUSE) --python $(WHEEL_PYTHON) $(WHEEL_ARGS)

# Every profile file writes out every setting in effect (DVC tracks values in files, not code defaults).
params: $(STAMP)
	$(PY) -m paper_repro params --write --all

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -i '^paper-repro' | \
	  { echo "# Exact pins installed by \`make setup\` and CI (pip install -r requirements.lock). Python 3.11."; \
	    echo "# Regenerate: make lock (pip freeze of a working .venv). pyproject.toml holds the ranges."; cat; } > requirements.lock

clean:
	rm -rf reports metrics runs profiles/*/reports profiles/*/metrics profiles/*/runs profiles/*/data/prepared

clean-all: clean
	rm -rf $(VENV) data/prepared data/standin
