"""The multi-process NT-Xent benchmark: its communication accounting, and a quick run on Gloo
that writes a CSV and a plot with one row per world size and method."""
import csv
import sys

import pytest

from contrastive_kernels.bench.distributed import volume
from helpers import run_from_checkout


@pytest.mark.parametrize("world, n, dim", [(2, 512, 128), (4, 2048, 128), (3, 7, 5)])
def test_fused_moves_about_half_the_bytes_of_gather_with_gradient(world, n, dim):
    fused, baseline = volume("fused", world, n, dim), volume("all_gather", world, n, dim)
    rows = 2 * n
    # Both gather the 2N x D rows forward; the baseline also sends every gathered row's gradient
    # back, the fused backward only (lse, grad) per row.
    assert fused["forward"] == baseline["forward"] == (world - 1) * rows * dim * 4
    assert baseline["backward"] == (world - 1) * rows * dim * 4
    assert fused["backward"] == (world - 1) * rows * 2 * 4
    ratio = (fused["forward"] + fused["backward"]) / (baseline["forward"] + baseline["backward"])
    assert ratio == pytest.approx((1 + 2 / dim) / 2)
    assert fused["handshake"] == (world - 1) * 40
    assert sum(volume("fused", 1, n, dim).values()) == sum(volume("all_gather", 1, n, dim).values()) == 0


@pytest.mark.slow
def test_quick_run_writes_rows_for_every_world_and_method(tmp_path):
    # triton_interpret=False: fused_ntxent on CPU takes the C++ kernel
    result = run_from_checkout([sys.executable, "-m", "contrastive_kernels.bench.distributed", "--quick",
                                "--worlds", "1,2", "--out", str(tmp_path)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = tmp_path.glob("distributed-cpu-float32-*.csv")
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(path)))
    assert [(r["world"], r["method"]) for r in rows] == [("1", "fused"), ("1", "all_gather"),
                                                         ("2", "fused"), ("2", "all_gather")]
    for row in rows:
        assert row["machine"] and row["torch"] and row["commit"]
        assert float(row["ms_per_step"]) > 0 and float(row["peak_mb"]) >= 0
        moved = volume(row["method"], int(row["world"]), int(row["n_per_rank"]), int(row["dim"]))
        assert int(row["bytes_sent_per_rank"]) == sum(moved.values())
    assert rows[0]["impl"] == "fused-cpu (auto)"
    assert float(rows[3]["speedup_vs_all_gather"]) == 1.0
    assert "speedup_vs_all_gather" in result.stdout


def test_bad_worlds_are_refused():
    from contrastive_kernels.bench import distributed

    with pytest.raises(SystemExit):
        distributed.main(["--worlds", "0,2"])
