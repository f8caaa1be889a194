"""Memory grows with N*D, not N^2: peak RSS of one forward+backward in a fresh process."""
import subprocess
import sys
import textwrap

import pytest

PROBE = """
import json, torch
from contrastive_kernels import fused_ntxent

def status_kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

n2, d = {n2}, 8
z_a = torch.randn(n2 // 2, d, requires_grad=True)
z_b = torch.randn(n2 // 2, d, requires_grad=True)
step = lambda: torch.autograd.grad(fused_ntxent(z_a, z_b, backend="{backend}"), (z_a, z_b))
step()  # warm-up: extension load, allocator
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status_kb("VmRSS")
step()
print(json.dumps((status_kb("VmHWM") - before) / 1024))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend,limit_mb", [("cpu", 48), ("torch", 200)])
def test_peak_memory_is_far_below_one_n_squared_matrix(backend, limit_mb):
    n2 = 16384  # one 2N x 2N float32 matrix is 1024 MiB; eager builds several
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE.format(n2=n2, backend=backend))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < limit_mb, f"{backend}: peak RSS grew {growth:.0f} MiB for 2N={n2}, D=8"
