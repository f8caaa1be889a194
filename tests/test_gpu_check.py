"""benchmarks/gpu_check.sh --dry-run: every step of the one-call GPU check, at tiny sizes on the
CPU, so the script is known to work before a GPU is lent."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for a dry run
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("== summary", 1)[1]
    for expected in ("ceilings:", "ntxent", "infonce", "momentum_update", "queue", "fused-triton", "TFLOP/s"):
        assert expected in summary, f"{expected!r} missing from the summary:\n{summary}"
    returned = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert returned == ["results.tar.gz", "summary.md", "tests.log"]  # the device tool brings back at most 8
    with tarfile.open(tmp_path / "results" / "results.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"ceilings.json", "ntxent_large.json", "summary.md", "bench.log"} <= names, names
    assert {"ntxent", "infonce", "momentum", "queue"} <= {n.split("-")[0] for n in names if n.endswith(".csv")}
    assert "efficiency" in (tmp_path / "results" / "summary.md").read_text()
