# The two quick-start commands: `make demo` (main job on the embedded model and data) and
# `make test` (the whole suite). Both set up .venv first; set-up is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser demo test test-fast app figures figures-runs bench bench-probe clean-runs

setup:
	@bash scripts/setup.sh

browser:
	@bash scripts/setup-browser.sh

demo: setup
	$(PY) -m lensbench eval --model smollm2-135m --task capitals --lenses logit,simlens \
	    --ablations drop-s,drop-a --out runs/demo

test: setup browser
	$(PY) -m pytest -q -rs tests

test-fast: setup
	$(PY) -m pytest -q -m "not browser and not slow" tests

app: setup
	$(VENV)/bin/streamlit run app/main.py

clean-runs:
	rm -rf runs/demo

# Every figure and table of docs/results.md, redrawn from the runs stored under results/
# (analyses/results_figures.py; no model is run). Options through FIGURES_ARGS, e.g.
#   make figures FIGURES_ARGS="--only sizes,icl --bootstrap 200"
FIGURES_ARGS ?=
figures: setup browser
	$(PY) -m analyses.results_figures $(FIGURES_ARGS)

# New runs and their figures (analyses/README.md): makes the runs it needs when they are missing
# (smollm2-135m on ARC-Easy, ARC-Challenge, BoolQ, MedMCQA by default), reuses those that exist,
# draws them into figures/. Options through RUNS_ARGS, e.g.
#   make figures-runs RUNS_ARGS="--models qwen2.5-coder-0.5b --limit 500 --device cuda"
RUNS_ARGS ?=
figures-runs: setup browser
	$(PY) -m analyses.make_all $(RUNS_ARGS)

# Throughput and peak memory: plain forward vs lens sweep vs naive loop vs SimExit
# (benchmarks/throughput.py; prints figures, asserts nothing). Options through BENCH_ARGS, e.g.
#   make bench BENCH_ARGS="--model random:llama2-7b-shape --device cuda --dtype bfloat16 --batch-size auto"
# The GPU suite: bash benchmarks/gpu_suite.sh (see docs/performance.md).
BENCH_ARGS ?=
bench: setup
	$(PY) benchmarks/throughput.py $(BENCH_ARGS)

# The live probe's warm latency per lens set (benchmarks/probe_latency.py; fits a Linear
# SimLens and a tuned lens first unless PROBE_ARGS="--linear DIR DIR").
PROBE_ARGS ?= --fit
bench-probe: setup
	$(PY) benchmarks/probe_latency.py $(PROBE_ARGS)
