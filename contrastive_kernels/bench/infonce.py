"""MoCo InfoNCE forward, backward and forward+backward against the queue: fused backends vs
MoCo's eager loss (cat([l_pos, l_neg]) / T + cross-entropy) and torch.compile of it. Writes a
CSV and a PNG to benchmarks/results/ and prints a table.

    python -m contrastive_kernels.bench.infonce --device cpu      # N=256, K in {16384, 65536}, D=128
    python -m contrastive_kernels.bench.infonce --points 4096,256,128 --no-memory   # K_queue,N,D
"""
import sys

import torch
import torch.nn.functional as F

from .loss_bench import LossBenchmark, live_fused_backends

from contrastive_kernels import fused_infonce, reference
from contrastive_kernels.ops.infonce import SUPPORTED_BACKENDS

TEMPERATURE = 0.07


def implementations(device):
    torch._dynamo.config.cache_size_limit = 64
    impls = {"eager": reference.infonce, "compile": torch.compile(reference.infonce)}
    impls.update(live_fused_backends(fused_infonce, SUPPORTED_BACKENDS, device))
    return {name: (lambda fn: lambda q, k, queue: fn(q, k, queue, TEMPERATURE))(fn) for name, fn in impls.items()}


def make_inputs(point, dtype, device):
    queue_rows, n, d = point
    gen = torch.Generator().manual_seed(n * 7 + queue_rows)
    q = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    queue = F.normalize(torch.randn(queue_rows, d, generator=gen), dim=1).to(device, dtype)
    return q, k, queue


BENCH = LossBenchmark(
    "infonce", "contrastive_kernels.bench.infonce", implementations, make_inputs,
    point_keys=("k_queue", "n", "d"),
    panel_key="n", default_points={"cpu": [(16384, 256, 128), (65536, 256, 128)],
                                   "cuda": [(16384, 256, 128), (65536, 256, 128), (65536, 1024, 128)]},
    # Eager: the N x K x D GEMM against the queue forward, one more for dq backward.
    matmul_flops=lambda point, mode: {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * point[0] * point[1] * point[2])


if __name__ == "__main__":
    sys.exit(BENCH.main(description=__doc__.split("\n\n")[0]))
