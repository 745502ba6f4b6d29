# The two quick-start commands: `make demo` (main job on the embedded model and data) and
# `make test` (the whole suite). Both set up .venv first; set-up is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser demo test test-fast app figures bench clean-runs

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
