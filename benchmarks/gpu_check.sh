#!/usr/bin/env bash
# The GPU check in one call, for a machine with one CUDA GPU and no network (about 8 minutes on
# one H200, estimated): build csrc/ for this GPU, run every gpu-marked test, run
# `python -m contrastive_kernels bench` (the device's ceilings, every op at GPU sizes, efficiency
# columns, summary.md) and one NT-Xent forward+backward at 2N = 1,048,576 in bf16.
# Results go to benchmarks/results/<gpu>-<date>/ (and, archived, to $OUT when set); a short
# table comes last.
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
    quick=(--quick)
    large_args=(--rows 2048 --dim 32 --dtype float32)
    tests=(-m gpu)  # collected, and skipped without a GPU
else
    device=cuda
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
    results=benchmarks/results/$gpu-$(date +%F)
    # Build for this GPU only (the default list, 8.0;9.0, is for shipping).
    export TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
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

log "benchmarks: ceilings, every op, efficiency, summary.md"
"$PY" -m contrastive_kernels bench --device "$device" --out "$results" "${quick[@]}" > "$results/bench.log" 2>&1

log "NT-Xent at ${large_args[*]}"
"$PY" -m contrastive_kernels.bench.ntxent_large --device "$device" "${large_args[@]}" | tee "$results/ntxent_large.json"

if [ -n "${OUT:-}" ]; then
    # At most 8 files come back from the device tool: the whole folder as one archive, and the
    # two files to read first.
    mkdir -p "$OUT/results"
    tar -czf "$OUT/results/results.tar.gz" -C "$(dirname "$results")" "$(basename "$results")"
    cp "$results/summary.md" "$results/tests.log" "$OUT/results/"
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
            print(f"{row['op']:>9} {row['dtype']:>9} {size:<28} {row['impl']:<20} {time:>10} "
                  f"efficiency {row['efficiency']}")
large = json.load(open(f"{results}/ntxent_large.json"))
print(f"ntxent 2N={large['rows']} D={large['dim']} {large['dtype']}: {large['seconds']} s, "
      f"{large['peak_mb']} MB peak, {large['tflops']} TFLOP/s (eager logits alone: {large['eager_logits_gib']} GiB)")
PYTHON
