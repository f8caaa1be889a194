"""Which backend runs an op: the names, what each needs, and the `auto` choice.

Every op resolves its `backend` argument here, inside the registered op, so that
`torch.compile` never traces this file. See DESIGN section 4 and `python -m contrastive_kernels env`.
"""
import functools
import os

import torch

from . import _build

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Triton decides at decoration time whether @triton.jit kernels run compiled or in the
# interpreter, so the interpreter counts only if it was switched on before this import.
try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
    TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
except ImportError as error:  # CPU-only torch wheels come without triton

    class _NoTriton:
        """Stands in for triton and triton.language so the kernel files still import."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    TRITON_ERROR = f"triton is not importable ({error})"
    TRITON_INTERPRET = False


def check_backend_name(backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def unavailable_reason(backend, device):
    """None if `backend` can run on `device`, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_ERROR:
            return TRITON_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and TRITON_INTERPRET:
            return None
        return (f"Triton kernels need a CUDA tensor (got {device.type}); CPU tensors run them only "
                "when TRITON_INTERPRET=1 was set before triton was imported")
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"the {backend} backend runs {backend} tensors, got a {device.type} tensor"
        return _build.load(backend)
    raise ValueError(f"unknown backend {backend!r}")


@functools.lru_cache(maxsize=None)
def _auto_choice(supported, device_type):
    # Fastest first: Triton and the CUDA C++ kernels on GPUs, the C++ kernels on CPUs.
    order = ("triton", "cuda", "torch") if device_type == "cuda" else ("cpu", "torch")
    for backend in order:
        if backend in supported and unavailable_reason(backend, torch.device(device_type)) is None:
            return backend
    raise ValueError(f"no backend among {supported} can run on {device_type}")


def resolve(op_name, backend, device, supported):
    """The concrete backend for `backend` ("auto" or a name) on `device`, or a ValueError."""
    check_backend_name(backend)
    if backend == "auto":
        return _auto_choice(tuple(supported), device.type)
    if backend not in supported:
        raise ValueError(f"backend={backend!r} is not implemented for {op_name}; it has {supported}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} is not available for {op_name}: {reason}")
    return backend


def accumulate_dtype(x):
    """The dtype the kernels accumulate in for inputs like x: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_tile_config(x):
    """Launch parameters of the row-block x column-tile loss kernels for (rows, D) inputs like x:
    fixed block sizes chosen by D (deterministic results, no autotuning)."""
    block_d = max(16, triton.next_power_of_2(x.shape[1]))
    block_m, block_n = (64, 64) if block_d <= 128 else (32, 64) if block_d <= 256 else (16, 32)
    if x.dtype == torch.float64:
        precision = "ieee"
    elif x.dtype == torch.float32:
        # Follow torch's own fp32 matmul setting: "highest" (the default) is exact fp32.
        precision = {"highest": "ieee", "high": "tf32x3"}.get(torch.get_float32_matmul_precision(), "tf32")
    else:
        precision = "tf32"  # ignored for fp16/bf16 inputs
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision,
                ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                num_warps=4 if block_d <= 128 else 8)
