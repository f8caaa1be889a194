"""`python -m contrastive_kernels bench`: every op's benchmark on one device, into one folder.

    benchmarks/results/<device-name>-<date>/
        <op>-....csv, <op>-....png     one per op (time and peak memory against problem size)
        ceilings.json                  copy bandwidth and matmul rates (bf16 and tf32 on CUDA, fp32 on CPU)
        summary.md                     the headline rows of every op, with where they came from

Every row gets `efficiency`: its TFLOP/s against the matmul ceiling of its dtype (loss kernels;
the yardstick is the eager loss's matmul work) or its GB/s against the copy bandwidth (momentum,
queue). The ceilings are measured in the same run, on the same device.
"""
import csv
import datetime
import importlib
import json
from pathlib import Path

import torch

from . import ceilings as ceilings_module
from . import common

OPS = ("ntxent", "infonce", "momentum", "queue")

# Per op and device type: the runs of its main() (a list of argument lists); "quick" is a smoke run.
ARGUMENTS = {
    "ntxent": {"cpu": [["--points", "1024,128", "4096,128", "8192,128"]],
               "cuda": [["--dtype", "bfloat16", "--points", "4096,128", "16384,128", "65536,128"],
                        ["--dtype", "float32", "--points", "16384,128"]],
               "quick": [["--points", "512,64", "--repeats", "2", "--no-memory"]]},
    "infonce": {"cpu": [[]], "cuda": [["--dtype", "bfloat16"]],
                "quick": [["--points", "4096,64,64", "--repeats", "2", "--no-memory"]]},
    "momentum": {"cpu": [[]], "cuda": [[], ["--online-dtype", "bfloat16"]],
                 "quick": [["--quick", "--rounds", "3", "--no-memory"]]},
    "queue": {"cpu": [[]], "cuda": [[]], "quick": [["--quick", "--repeats", "5"]]},
}


def default_out(device):
    meta = common.provenance(device)
    return common.RESULTS_DIR / f"{common.slug(meta['machine'])}-{meta['date']}"


def run(ops, device, quick=False, out=None):
    """Runs the benchmarks of `ops` on `device`, writes every file into `out`; returns `out`."""
    device = torch.device(device)
    out = Path(out) if out is not None else default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        sizes = dict(copy_mb=16, matmul_n=512, repeats=3)
    else:  # an 8192^3 fp32 matmul takes seconds on a small CPU: 2048 is enough to reach its rate
        sizes = {} if device.type == "cuda" else dict(copy_mb=256, matmul_n=2048, repeats=5)
    ceilings = ceilings_module.ceilings(device, **sizes)
    (out / "ceilings.json").write_text(json.dumps(ceilings, indent=1) + "\n")
    print(f"ceilings: {ceilings}")
    written = {}
    for op in ops:
        print(f"\n== {op} ({device.type}{', quick' if quick else ''})", flush=True)
        module = importlib.import_module(f"{__package__}.{op}")
        before = set(out.glob("*.csv"))
        runner = module.BENCH.main if hasattr(module, "BENCH") else module.main
        for args in ARGUMENTS[op]["quick" if quick else device.type]:
            runner(["--device", str(device), "--out", str(out), *args])
        written[op] = sorted(set(out.glob("*.csv")) - before) or sorted(out.glob(f"{op}-*.csv"))
        for path in written[op]:
            add_efficiency(path, ceilings)
    write_summary(out, written, device, ceilings, quick)
    print(f"\nwrote {out}/ (summary.md, {sum(len(v) for v in written.values())} CSVs with their plots)")
    return out


def add_efficiency(path, ceilings):
    """Adds `efficiency` (a fraction of the device's ceiling) to every row of a CSV."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row.get("tflops"):
            low_precision = row["dtype"] in ("bfloat16", "float16")
            kind = "bf16" if low_precision and "matmul_bf16_tflops" in ceilings else (
                "tf32" if "matmul_tf32_tflops" in ceilings else "fp32")
            row["efficiency"] = round(float(row["tflops"]) / ceilings[f"matmul_{kind}_tflops"], 3)
        elif row.get("gb_per_s"):
            row["efficiency"] = round(float(row["gb_per_s"]) / ceilings["copy_gb_per_s"], 3)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


# What summary.md shows of each op: the row filter, the columns, and the ratio that matters.
SUMMARY = {
    "ntxent": (lambda r: r["mode"] == "fwd+bwd", ["n2", "d", "dtype", "impl", "median_ms", "speedup_vs_eager",
                                                   "tflops", "peak_mb"]),
    "infonce": (lambda r: r["mode"] == "fwd+bwd", ["k_queue", "n", "d", "dtype", "impl", "median_ms",
                                                    "speedup_vs_eager", "tflops", "peak_mb"]),
    "momentum_update": (lambda r: True, ["set", "values", "dtype", "online_dtype", "impl", "median_ms", "gb_per_s",
                                         "speedup_vs_moco", "vs_foreach_lerp", "peak_mb"]),
    "queue": (lambda r: True, ["k_queue", "batch", "d", "impl", "median_us", "gb_per_s", "speedup_vs_moco"]),
}


def write_summary(out, written, device, ceilings, quick):
    """summary.md: provenance, ceilings, and per CSV its plot and headline rows."""
    meta = common.provenance(device)
    lines = [f"# Benchmarks: {meta['machine']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}, commit {meta['commit']}. "
             f"Made by `python -m contrastive_kernels bench --device {device.type}{' --quick' if quick else ''}` "
             f"on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Times are medians of repeated runs; "
             "peak memory is the growth during one call (fresh process per point on CPU).", ""]
    rates = ", ".join(f"{k[7:-7]} matmul {v} TFLOP/s" for k, v in ceilings.items() if k.startswith("matmul_"))
    lines += [f"Ceilings measured in this run: copy {ceilings['copy_gb_per_s']} GB/s (read + write), {rates}. "
              "`efficiency` is a row's TFLOP/s (the eager loss's matmul work over the time) or GB/s against "
              "them.", ""]
    for op, paths in written.items():
        for path in paths:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            keep, columns = SUMMARY[rows[0]["op"]]
            columns = [c for c in columns + ["efficiency"] if c in rows[0]]
            lines += [f"## {op}: `{path.name}`", "", f"![{op}]({path.with_suffix('.png').name})", "",
                      "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows if keep(row)]
            lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
