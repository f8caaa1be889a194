"""What the device can do at best, measured in the same run as the kernels: device-to-device copy
bandwidth (GB/s, read + write) and dense matmul rates (TFLOP/s) in bf16 and tf32 (fp32 on a CPU).
Prints one JSON object.

    python -m contrastive_kernels.bench.ceilings --device cuda
"""
import argparse
import json
import sys

import torch

from . import common


def ceilings(device, copy_mb=1024, matmul_n=8192, repeats=10):
    device = torch.device(device)
    src = torch.empty(copy_mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = common.median_seconds(lambda: dst.copy_(src), device, repeats, warmup=2)
    result = {"device": common.provenance(device)["machine"], "copy_gb_per_s": round(2 * src.nbytes / seconds / 1e9, 1)}
    kinds = {"bf16": torch.bfloat16, "tf32": torch.float32} if device.type == "cuda" else {"fp32": torch.float32}
    for name, dtype in kinds.items():
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            seconds = common.median_seconds(lambda: a @ b, device, repeats, warmup=2)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        result[f"matmul_{name}_tflops"] = round(2 * matmul_n**3 / seconds / 1e12, 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    sizes = dict(copy_mb=16, matmul_n=512, repeats=3) if args.quick else {}
    print(json.dumps(ceilings(args.device, **sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
