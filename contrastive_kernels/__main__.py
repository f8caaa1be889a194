"""Command line: `python -m contrastive_kernels train ...` runs a SimCLR or MoCo trainer;
`python -m contrastive_kernels env` shows versions and which backends are live."""
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m contrastive_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cli.add_parser(commands)
    commands.add_parser("env", help="versions, toolchain and which backend is live for each op (may build csrc/)")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_cli.run(args)
    print(env_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
