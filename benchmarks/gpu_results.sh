#!/usr/bin/env bash
# A shipped model's result runs (docs/results.md's main table) on a GPU machine with no network,
# in one call, from a kit carried there (`python scripts/gpu_kit.py pack --model M --wheels`):
#
#   bash benchmarks/gpu_results.sh                 # MODEL=qwen2.5-coder-1.5b, everything under $OUT
#
# 1. installs the kit's wheels if transformer_lens, gguf or datasets is missing (never torch);
#    lensbench and the kit's task data run from the checkout (PYTHONPATH), nothing is installed for them;
# 2. joins the model's GGUF from the kit's pieces and verifies its pinned sha256 (gpu_kit.py join);
# 3. runs benchmarks/results_suite.py: per task, Linear SimLens and the tuned lens fitted on
#    T@calib, runs on T@calib and T@test with the ablations, calibration, SimExit wall-clock at
#    batch 1 and 16, report.json; time-boxed by BUDGET seconds (default 420: steps that would start
#    later are skipped and logged);
# 4. leaves in $OUT: results.json (every step, its time and status), suite.log, and one tar per
#    task of its run folders (lens configs without their weights; the device tool returns at most 8 files).
#
# Environment: MODEL, TASKS (results_suite's --tasks), TUNED_TASKS, SPEED_TASKS, SPEED_EXAMPLES, FIT_STEPS, BUDGET, BATCH,
# DEVICE (default cuda; cpu to try the script itself on a small model), KIT (default .gpu-kit), PYTHON (default python), LENSBENCH_CACHE (default ./.lbcache).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
KIT=${KIT:-.gpu-kit}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
TASKS=${TASKS:-arc-easy:test=600,boolq=600,arc-challenge:test=600,medmcqa=600}
TUNED_TASKS=${TUNED_TASKS:-arc-easy:test,boolq,arc-challenge:test,medmcqa}
SPEED_TASKS=${SPEED_TASKS:-arc-easy:test,arc-challenge:test}
RESULTS=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LENSBENCH_CACHE=${LENSBENCH_CACHE:-$PWD/.lbcache}
export PYTHONPATH="$PWD/$KIT/data:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/suite.log") 2>&1
echo "=== $(date -u +%FT%T) $MODEL on $TASKS (budget ${BUDGET:-420}s)"

if ! "$PY" -c "import transformer_lens, gguf, datasets" 2> /dev/null; then
  [ -d "$KIT/wheels" ] || { echo "gpu_results: transformer_lens is missing and $KIT/wheels was not carried"; exit 2; }
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps "$KIT"/wheels/*.whl \
    || { echo "gpu_results: installing the kit's wheels failed"; exit 2; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
if [ -f "$KIT/kit.json" ]; then
  "$PY" scripts/gpu_kit.py join --dir "$KIT" || exit 2
fi

t0=$(date +%s)
TF32=(--tf32)
[ "${DEVICE:-cuda}" = cpu ] && TF32=()
"$PY" benchmarks/results_suite.py --model "$MODEL" --device "${DEVICE:-cuda}" "${TF32[@]}" --runs "${RUNS:-/tmp/gpu-results-runs}" \
  --log "$RESULTS/results.json" --pack "$RESULTS" --budget "${BUDGET:-420}" --batch-size "${BATCH:-32}" \
  --issue2-limit 0 --issue3-tasks "" --tasks "$TASKS" --fit-steps "${FIT_STEPS:-300}" --speed-examples "${SPEED_EXAMPLES:-100}" --tuned-tasks "$TUNED_TASKS" --speed-tasks "$SPEED_TASKS"
rc=$?
echo "=== results_suite exit $rc after $(( $(date +%s) - t0 ))s; in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
exit $rc
