"""One NT-Xent forward+backward at a size the eager loss cannot hold (2N = 1,048,576 rows by
default: its logits alone would be 4 TiB in fp32), with its time, peak memory and achieved
TFLOP/s (6 (2N)^2 D flops for forward+backward). Prints one JSON object.

    python -m contrastive_kernels.bench.ntxent_large --device cuda --rows 1048576 --dim 128 --dtype bfloat16
"""
import argparse
import json
import sys
import time

import torch

from . import common

from contrastive_kernels import fused_ntxent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1 << 20, help="2N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    z = torch.randn(args.rows, args.dim, device=device, dtype=dtype)
    z_a, z_b = z[: args.rows // 2].requires_grad_(), z[args.rows // 2:].requires_grad_()

    def step():
        torch.autograd.grad(fused_ntxent(z_a, z_b, 0.2, backend=args.backend), (z_a, z_b))

    step()  # compile and warm up
    common.synchronize(device)
    start = time.perf_counter()
    if device.type == "cuda":
        peak_mb = common.cuda_peak_growth_mb(step)
    else:
        peak_mb = common.cpu_peak_growth_mb(step)
    seconds = time.perf_counter() - start
    flops = 6 * args.rows**2 * args.dim
    print(json.dumps({"op": "ntxent_large", "rows": args.rows, "dim": args.dim, "dtype": args.dtype,
                      "backend": args.backend, "seconds": round(seconds, 4), "peak_mb": round(peak_mb, 1),
                      "tflops": round(flops / seconds / 1e12, 2),
                      "eager_logits_gib": round(args.rows**2 * 4 / 2**30, 1), **common.provenance(device)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
