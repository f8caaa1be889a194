"""Command line: `python -m contrastive_kernels train ...` runs a SimCLR or MoCo trainer,
`... bench` runs the microbenchmarks, `... env` shows versions and which backends are live."""
import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import _backends, _build
from .ops import infonce, momentum, ntxent, queue
from .trainers import cli as train_cli

OPS = {"fused_ntxent": ntxent.SUPPORTED_BACKENDS, "fused_infonce": infonce.SUPPORTED_BACKENDS,
       "momentum_update": momentum.SUPPORTED_BACKENDS, "KeyQueue.enqueue": queue.SUPPORTED_BACKENDS}


def _first_line(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"not found ({error.__class__.__name__})"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if "nvcc" in command[0] and lines else (lines[0] if lines else "no output")


def env_report():
    cuda_home = _build.ensure_cuda_home()
    lines = [
        f"python        {sys.version.split()[0]} ({platform.machine()}, {sys.prefix})",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"{torch.get_num_threads()} CPU threads)",
        f"triton        {getattr(_backends.triton, '__version__', _backends.TRITON_ERROR)}"
        f"{' (interpreter: TRITON_INTERPRET=1)' if _backends.TRITON_INTERPRET else ''}",
        f"GPU           {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or 'none'}",
        f"nvcc          {_first_line([os.path.join(cuda_home, 'bin', 'nvcc'), '--version']) if cuda_home else 'not found'}",
        f"c++ compiler  {_first_line([os.environ.get('CXX', 'c++'), '--version']) if shutil.which(os.environ.get('CXX', 'c++')) else 'not found'}",
        f"ninja         {_first_line(['ninja', '--version']) if shutil.which('ninja') else 'not found'}",
        f"csrc/         {_build.csrc_dir() or 'missing'}",
        f"build cache   {_build.cache_dir()}",
        "",
        "backends (auto = the first live one: triton, cuda, torch on GPUs; cpu, torch on CPUs)",
    ]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op, backends in OPS.items():
        for device in devices:
            for backend in backends:
                reason = _backends.unavailable_reason(backend, device)
                lines.append(f"  {op:<17} {device.type:<5} {backend:<7} "
                             f"{'live' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def run_bench(args):
    from .bench import suite

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in suite.OPS]
    if unknown or not ops:
        print(f"error: unknown op(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(suite.OPS)}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    suite.run(ops, args.device, quick=args.quick, out=args.out)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m contrastive_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cli.add_parser(commands)
    bench = commands.add_parser("bench", help="benchmark the ops against eager PyTorch and torch.compile",
                                description="Every op's benchmark on one device: CSVs, plots and summary.md in "
                                            "benchmarks/results/<device-name>-<date>/ (or --out).")
    bench.add_argument("--ops", default="ntxent,infonce,momentum,queue",
                       help="comma-separated subset of ntxent,infonce,momentum,queue (default: all)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    bench.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke run")
    bench.add_argument("--out", help="output folder (default: benchmarks/results/<device-name>-<date>/)")
    commands.add_parser("env", help="versions, toolchain and which backend is live for each op (may build csrc/)")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "bench":
        return run_bench(args)
    print(env_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
