"""`python -m contrastive_kernels bench`: one folder of CSVs, plots, ceilings and summary.md, with
provenance and efficiency in every row; bad arguments are refused."""
import csv
import json
import sys
from pathlib import Path

import pytest

from helpers import run_from_checkout


def run_bench(*args, cwd):
    # triton_interpret=False: the CPU suite runs the C++ and torch backends
    return run_from_checkout([sys.executable, "-m", "contrastive_kernels", "bench", *args], cwd=cwd,
                             triton_interpret=False)


@pytest.mark.slow
def test_quick_bench_writes_csv_plots_ceilings_and_summary(tmp_path):
    result = run_bench("--device", "cpu", "--quick", "--ops", "ntxent,queue", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    csvs = sorted(out.glob("*.csv"))
    assert [p.name.split("-")[0] for p in csvs] == ["ntxent", "queue"]
    assert all(p.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" for p in csvs)
    ceilings = json.loads((out / "ceilings.json").read_text())
    assert ceilings["copy_gb_per_s"] > 0 and ceilings["matmul_fp32_tflops"] > 0
    for path in csvs:
        rows = list(csv.DictReader(open(path)))
        for row in rows:
            assert row["machine"] and row["torch"] and row["commit"] and row["date"]
            rate = float(row["tflops"]) / ceilings["matmul_fp32_tflops"] if "tflops" in row else \
                float(row["gb_per_s"]) / ceilings["copy_gb_per_s"]
            assert float(row["efficiency"]) == pytest.approx(rate, abs=1e-3)
    summary = (out / "summary.md").read_text()
    assert "python -m contrastive_kernels bench --device cpu --quick" in summary
    assert "Ceilings measured in this run" in summary and " efficiency |" in summary
    assert "fused-cpu (auto)" in summary and "KeyQueue-cpu (auto)" in summary
    assert f"({csvs[0].with_suffix('.png').name})" in summary


def test_default_folder_is_named_after_the_device_and_date():
    from contrastive_kernels.bench import common, suite

    meta = common.provenance("cpu")
    out = suite.default_out(__import__("torch").device("cpu"))
    assert out.parent == Path("benchmarks") / "results"
    assert out.name == f"{common.slug(meta['machine'])}-{meta['date']}"


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--ops", "ntxent,softmax"], "unknown op(s) softmax"),
    (["--ops", ","], "(none given)"),
])
def test_bad_bench_arguments(tmp_path, args, message):
    result = run_bench("--device", "cpu", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "benchmarks").exists()
