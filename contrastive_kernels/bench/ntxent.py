"""NT-Xent forward, backward and forward+backward: fused backends vs eager PyTorch and
torch.compile of the eager reference. Writes a CSV and a PNG to benchmarks/results/ and prints
a table.

    python -m contrastive_kernels.bench.ntxent --device cpu                  # 2N in {1024, 4096, 8192}, D in {128, 256}
    python -m contrastive_kernels.bench.ntxent --device cuda --dtype bfloat16  # 2N up to 65536
    python -m contrastive_kernels.bench.ntxent --points 2048,128 --no-memory
"""
import sys

import torch

from .loss_bench import LossBenchmark, live_fused_backends

from contrastive_kernels import fused_ntxent, reference
from contrastive_kernels.ops.ntxent import SUPPORTED_BACKENDS

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
    "ntxent", "contrastive_kernels.bench.ntxent", implementations, make_inputs,
    point_keys=("n2", "d"), panel_key="d",
    # Eager: the (2N)^2 x D logits GEMM forward, two GEMMs of that size backward.
    matmul_flops=lambda point, mode: {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * point[0] ** 2 * point[1],
    default_points={"cpu": [(n2, d) for d in (128, 256) for n2 in (1024, 4096, 8192)],
                    "cuda": [(n2, d) for d in (128, 256) for n2 in (1024, 4096, 16384, 65536)]})

if __name__ == "__main__":
    sys.exit(BENCH.main(description=__doc__.split("\n\n")[0]))
