#!/usr/bin/env bash
# The GPU check in one call, for a machine with one CUDA GPU and no network (about 8 minutes on
# one H200): build csrc/ for this GPU, run every gpu-marked test, measure the device's ceilings,
# run the benchmarks at GPU sizes and one NT-Xent forward+backward at 2N = 1,048,576 in bf16.
# Results go to benchmarks/results/<gpu>-<date>/ (and to $OUT when set); a short table comes last.
#
#   benchmarks/gpu_check.sh             on the GPU machine (python3 there must hold torch + triton)
#   benchmarks/gpu_check.sh --dry-run   the same steps at tiny sizes on the CPU, Triton in its
#                                       interpreter: what CI runs to keep this script working
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1

if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1
    device=cpu
    results=$(mktemp -d)/dry-run
    ntxent_args=(--points 256,32 --repeats 1 --no-memory)
    infonce_args=(--points 512,16,32 --repeats 1 --no-memory)
    quick=(--quick)
    large_args=(--rows 2048 --dim 32 --dtype float32)
    tests=(-m gpu)  # collected, and skipped without a GPU
else
    device=cuda
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
    results=benchmarks/results/$gpu-$(date +%F)
    # Build for this GPU only (the default list, 8.0;9.0, is for shipping).
    export TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    ntxent_args=(--points 16384,128 65536,128 --dtype bfloat16)
    infonce_args=(--points 65536,256,128 65536,4096,128 --dtype bfloat16)
    quick=()
    large_args=(--rows 1048576 --dim 128 --dtype bfloat16)
    tests=(-m gpu -x)
fi
mkdir -p "$results"
log() { echo "== $*" | tee -a "$results/check.log"; }

log "build csrc/ ($device)"
"$PY" -c "
from contrastive_kernels import _build
import sys
cpu, cuda = _build.load('cpu'), _build.load('cuda')
print('cpu extension:', cpu or 'ok'); print('cuda extension:', cuda or 'ok')
sys.exit(1 if cpu or (cuda and '$device' == 'cuda') else 0)
" 2>&1 | tee -a "$results/check.log"

log "gpu-marked tests"
"$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" tests 2>&1 | tee "$results/tests.log" | tail -n 15

log "device ceilings"
"$PY" benchmarks/gpu_ceilings.py --device "$device" "${quick[@]}" | tee "$results/ceilings.json"

log "benchmarks"
"$PY" benchmarks/bench_ntxent.py --device "$device" --out "$results" "${ntxent_args[@]}" > "$results/ntxent.log" 2>&1
[ "$dry_run" = 1 ] || "$PY" benchmarks/bench_ntxent.py --device cuda --out "$results" --points 16384,128 \
    --dtype float32 >> "$results/ntxent.log" 2>&1
"$PY" benchmarks/bench_infonce.py --device "$device" --out "$results" "${infonce_args[@]}" > "$results/infonce.log" 2>&1
"$PY" benchmarks/bench_momentum.py --device "$device" --out "$results" "${quick[@]}" > "$results/momentum.log" 2>&1
"$PY" benchmarks/bench_queue.py --device "$device" --out "$results" "${quick[@]}" > "$results/queue.log" 2>&1

log "NT-Xent at ${large_args[*]}"
"$PY" benchmarks/ntxent_large.py --device "$device" "${large_args[@]}" | tee "$results/ntxent_large.json"

if [ -n "${OUT:-}" ]; then
    # At most 8 files come back from the device tool: the CSVs, the JSONs and the test log.
    mkdir -p "$OUT/results"
    cp "$results"/*.csv "$results"/*.json "$results/tests.log" "$OUT/results/" 2>/dev/null || true
fi

log "summary"
"$PY" - "$results" <<'PYTHON'
import csv, glob, json, sys
results = sys.argv[1]
print(open(f"{results}/tests.log").read().strip().splitlines()[-1])
ceilings = json.load(open(f"{results}/ceilings.json"))
print("ceilings:", {k: v for k, v in ceilings.items() if k != "device"})
for path in sorted(glob.glob(f"{results}/*.csv")):
    for row in csv.DictReader(open(path)):
        if row.get("mode", "fwd+bwd") == "fwd+bwd" and row.get("online_dtype") in (None, "", row.get("dtype")):
            size = " ".join(f"{k}={row[k]}" for k in ("n2", "k_queue", "n", "d", "set", "batch") if row.get(k))
            time = row.get("median_ms") or row.get("median_us", "") + " us"
            print(f"{row['op']:>9} {row['dtype'] if 'dtype' in row else '':>9} {size:<28} {row['impl']:<20} {time:>10}")
large = json.load(open(f"{results}/ntxent_large.json"))
print(f"ntxent 2N={large['rows']} D={large['dim']} {large['dtype']}: {large['seconds']} s, "
      f"{large['peak_mb']} MB peak, {large['tflops']} TFLOP/s (eager logits alone: {large['eager_logits_gib']} GiB)")
PYTHON
