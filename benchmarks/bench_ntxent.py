"""NT-Xent forward, backward and forward+backward: fused backends vs eager PyTorch and
torch.compile of the eager reference. Writes a CSV and a PNG to benchmarks/results/ and prints
a table.

    python benchmarks/bench_ntxent.py --device cpu                  # 2N in {1024, 4096, 8192}, D in {128, 256}
    python benchmarks/bench_ntxent.py --device cuda --dtype bfloat16  # 2N up to 65536
    python benchmarks/bench_ntxent.py --points 2048,128 --no-memory
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_bench import LossBenchmark, live_fused_backends  # noqa: E402

from contrastive_kernels import fused_ntxent, reference  # noqa: E402
from contrastive_kernels.ops.ntxent import SUPPORTED_BACKENDS  # noqa: E402

TEMPERATURE = 0.5


def implementations(device):
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape
    impls = {"eager": reference.ntxent, "compile": torch.compile(reference.ntxent)}
    impls.update(live_fused_backends(fused_ntxent, SUPPORTED_BACKENDS, device))
    return {name: (lambda fn: lambda z_a, z_b: fn(z_a, z_b, TEMPERATURE))(fn) for name, fn in impls.items()}


def make_inputs(point, dtype, device):
    n2, d = point
    z = torch.randn(n2, d, generator=torch.Generator().manual_seed(n2 * 1000 + d)).to(device, dtype)
    return z[: n2 // 2].clone().requires_grad_(), z[n2 // 2:].clone().requires_grad_()


BENCH = LossBenchmark(
    "ntxent", Path(__file__).resolve(), implementations, make_inputs, point_keys=("n2", "d"), panel_key="d",
    default_points={"cpu": [(n2, d) for d in (128, 256) for n2 in (1024, 4096, 8192)],
                    "cuda": [(n2, d) for d in (128, 256) for n2 in (1024, 4096, 16384, 65536)]})

if __name__ == "__main__":
    sys.exit(BENCH.main(description=__doc__.split("\n\n")[0]))
