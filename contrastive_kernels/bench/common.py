"""Shared benchmark plumbing: timing, peak memory, where results came from, CSV and plots.

Timing: median of `repeats` runs after warm-up, synchronising CUDA around each run.
Peak memory: on CUDA, torch.cuda.max_memory_allocated around one run, minus what was
allocated before it. On CPU, in a fresh process per point: after a warm-up run, write 5 to
/proc/self/clear_refs (resets VmHWM to the current RSS), run once, and report VmHWM minus the RSS
before the run. (ru_maxrss survives exec and would report the parent's peak.)
"""
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks") / "results"  # relative to where the benchmark is run
REPO = Path(__file__).resolve().parents[2]  # the source checkout, when this is one


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats, warmup=1, setup=None):
    """Median wall time of fn() over `repeats` runs; setup() runs untimed before each."""
    times = []
    for i in range(warmup + repeats):
        state = setup() if setup else None
        synchronize(device)
        start = time.perf_counter()
        fn(state) if setup else fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_growth_mb(fn):
    """Peak RSS growth of one fn() call in this process (run fn once before, as warm-up)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def cuda_peak_growth_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_in_fresh_process(module, args):
    """Runs `python -m module --measure-memory args...` and returns the JSON it prints last."""
    out = subprocess.run([sys.executable, "-m", module, "--measure-memory", *map(str, args)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def provenance(device):
    """Where a result came from: machine, versions, commit, date."""
    from contrastive_kernels import __version__

    try:
        if not (REPO / ".git").exists():
            raise OSError("not a source checkout")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Uncommitted changes to the code mark the commit; docs and earlier results do not.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "contrastive_kernels",
                                "csrc", "setup.py"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = f"installed {__version__}"
    if torch.device(device).type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = _cpu_name() + f" ({os.cpu_count()} cores)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"machine": machine, "torch": torch.__version__, "triton": triton_version,
            "commit": commit, "date": datetime.date.today().isoformat(), "python": platform.python_version()}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text):
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def write_csv(path, rows, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys()) + list(meta.keys())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})


def format_table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda values: "  ".join(str(v).rjust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line("-" * w for w in widths)] + [line([r[c] for c in columns]) for r in rows])


def save_figure(fig, path):
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def live_backends(supported, device):
    """{backend: label} for every backend in `supported` that runs on `device`; the label marks the
    one that backend="auto" picks, e.g. "cpu (auto)"."""
    from contrastive_kernels._backends import _auto_choice, unavailable_reason

    auto = _auto_choice(tuple(supported), device.type)
    return {b: b + (" (auto)" if b == auto else "") for b in supported if unavailable_reason(b, device) is None}
