"""Momentum (EMA) update of a target network: target <- m * target + (1 - m) * online, in place.

Every tensor pair is updated in one pass (DESIGN section 2), with no autograd. `target` and
`online` are nn.Modules (their parameters, paired in order), sequences of tensors, or single
tensors (e.g. the flat buffers of `flatten_parameters`). Target and online dtypes may differ
(float16, bfloat16, float32, float64 in any pairing): the math runs in float32 (float64 when
either side is float64) and rounds once to the target's dtype, so an fp32 EMA of bf16 weights
at m = 0.999 keeps the update that a bf16 EMA rounds away.

Backends (DESIGN section 4):
  triton  one kernel over the flat span of each list: the tensors must lie back to back in one
          storage (same dtype, contiguous, in order), which `flatten_parameters` arranges;
          anything else is a ValueError, never a silent per-tensor loop. Under torch.compile,
          functionalization clones each mutated tensor, so pass the flat buffers themselves
          (what flatten_parameters returns) rather than lists of their views. Tested under
          TRITON_INTERPRET=1 on CPU tensors; the compiled kernel needs a GPU (tests marked `gpu`).
  cuda    csrc/cuda/momentum.cu: multi-tensor apply as in apex, a chunk table (addresses and
          sizes) copied to the device, one launch per (target, online) dtype pair, 16-byte
          vector loads where aligned. Any layout. Compiled in CI, run only where a GPU is lent.
  cpu     csrc/cpu/momentum.cpp: at::parallel_for over the concatenated element range of all
          tensors, so hundreds of small tensors still share the threads evenly; vectorised loops
          (float16 conversions stay scalar). Tested and benchmarked on a 2-core AVX-512 Xeon:
          ResNet-50 set (25.6M fp32 values) in ~9 ms, ~4x MoCo's loop, ~1.3x _foreach_lerp_.
  torch   torch._foreach_lerp_ (online cast to the target's dtype first when they differ); for
          m < 0.5, where lerp loses accuracy, _foreach_mul_ + _foreach_add_.
`auto` on CUDA prefers triton when both lists are flat, else cuda, else torch.

Non-contiguous tensors: the cpu and cuda backends update a non-contiguous target through a dense
copy written back in place, and read a non-contiguous online tensor through a dense copy; torch
handles any strides natively; triton rejects them (they are not one flat span).
"""
import torch

from .._backends import check_backend_name, resolve, tl, triton, unavailable_reason

SUPPORTED_BACKENDS = ("cuda", "triton", "cpu", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES = frozenset(SUPPORTED_DTYPES)
TRITON_BLOCK = 4096  # 16 fp32 values per thread at 8 warps: four 16-byte loads per tensor


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _momentum_kernel(TARGET, ONLINE, n, momentum: tl.float64, weight: tl.float64,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    # momentum and weight = 1 - m arrive as float64 (a Python float would be passed as fp32,
    # which costs a float64 EMA its 1e-12 accuracy) and are rounded to ACC once here; tl.full
    # rather than .to() or tl.cast, which the interpreter applies to an fp32-rounded constant.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(ACC)
    o = tl.load(ONLINE + offs, mask=mask, other=0.0).to(ACC)
    out = tl.full((), momentum, ACC) * t + tl.full((), weight, ACC) * o
    tl.store(TARGET + offs, out.to(TARGET.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _flat_span(tensors):
    """One 1-D view over `tensors` if they lie back to back in one storage (same dtype,
    contiguous, each starting where the previous one ended), else None (also when all are
    empty). Empty tensors occupy no span and are skipped."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return None
    first = tensors[0]
    storage, expected = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous() or t.data_ptr() != expected
                or t.untyped_storage().data_ptr() != storage):
            return None
        expected += t.numel() * t.element_size()
    return first.detach().as_strided(((expected - first.data_ptr()) // first.element_size(),), (1,))


def _triton_update(target, online, momentum):
    if not any(t.numel() for t in target):
        return
    flat_target, flat_online = _flat_span(target), _flat_span(online)
    if flat_target is None or flat_online is None:
        raise ValueError("backend='triton' needs `target` and `online` each laid out back to back in one "
                         "contiguous buffer of one dtype (call flatten_parameters(module) on both modules "
                         "first); use backend='cuda' or 'torch' (or 'cpu' on CPU tensors) for any layout")
    n = flat_target.numel()
    acc = tl.float64 if torch.float64 in (flat_target.dtype, flat_online.dtype) else tl.float32
    _momentum_kernel[(triton.cdiv(n, TRITON_BLOCK),)](flat_target, flat_online, n, momentum, 1.0 - momentum,
                                                      BLOCK=TRITON_BLOCK, ACC=acc, num_warps=8)


def _torch_update(target, online, momentum):
    online = [o if o.dtype == t.dtype else o.to(t.dtype) for t, o in zip(target, online)]
    if momentum >= 0.5:  # every real EMA: lerp's weight 1 - m <= 0.5 takes its t + w (o - t) branch
        torch._foreach_lerp_(target, online, 1.0 - momentum)
    else:
        # lerp's other branch, o - (o - t)(1 - w), rounds w = 1 - m to the dtype first: an error
        # of eps |o - t|, far above the eps (m|t| + (1 - m)|o|) of the two products here.
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)


def _native_update(target, online, momentum):
    torch.ops.contrastive_kernels.momentum_update_(target, online, momentum)


_UPDATE = {"triton": _triton_update, "cuda": _native_update, "cpu": _native_update, "torch": _torch_update}


def _choose(backend, target, online):
    device = target[0].device
    chosen = resolve("momentum_update", backend, device, SUPPORTED_BACKENDS)
    # `auto` means the fastest backend that runs this input: triton only takes flat buffers.
    if backend == "auto" and chosen == "triton" and (_flat_span(target) is None or _flat_span(online) is None):
        chosen = "cuda" if unavailable_reason("cuda", device) is None else "torch"
    return chosen


# ----------------------------------------------------------------------------------------
# Registered op
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive_kernels::momentum_update", mutates_args=("target",))
def momentum_update_op(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float,
                       backend: str) -> None:
    """target[i] = momentum * target[i] + (1 - momentum) * online[i], in place, for every i."""
    if not target:
        return
    chosen = _choose(backend, target, online)
    with torch.no_grad():  # no graph, and no per-tensor detach (~1 us each, hundreds of tensors)
        _UPDATE[chosen](target, online, float(momentum))


@momentum_update_op.register_fake
def _(target, online, momentum, backend):
    return None


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------
def _as_tensor_list(name, value):
    if isinstance(value, torch.nn.Module):
        return list(value.parameters())
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be an nn.Module, a tensor or a sequence of tensors, "
                        f"got {type(value).__name__}")
    tensors = list(value)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return tensors


def _check_inputs(target, online, momentum, backend):
    # One pass of cheap attribute tests per pair (a model has hundreds); messages only on failure.
    if len(target) != len(online):
        raise ValueError(f"target and online must hold as many tensors, got {len(target)} and {len(online)}")
    grad_mode = torch.is_grad_enabled()
    device = target[0].device if target else None
    for i, (t, o) in enumerate(zip(target, online)):
        for name, x in (("target", t), ("online", o)):
            if x.dtype not in _DTYPES:
                raise TypeError(f"{name}[{i}] must be float16, bfloat16, float32 or float64, got {x.dtype}")
            if x.device != device:
                raise ValueError(f"every tensor must be on one device: {name}[{i}] is on {x.device}, "
                                 f"target[0] on {device}")
        if t.shape != o.shape:
            raise ValueError(f"target[{i}] and online[{i}] must have the same shape, "
                             f"got {tuple(t.shape)} and {tuple(o.shape)}")
        if grad_mode and t.requires_grad:
            raise ValueError(f"target[{i}] requires grad and grad mode is on: an in-place update would be "
                             "recorded by autograd; call momentum_update under torch.no_grad() (or "
                             "requires_grad_(False) the target)")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    # NaN fails both comparisons; no math.isfinite, which torch.compile cannot trace on a SymFloat.
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a finite number in [0, 1], got {momentum}")
    check_backend_name(backend)


def momentum_update(target, online, momentum, *, backend="auto"):
    """target <- momentum * target + (1 - momentum) * online, in place, without autograd.

    target, online: nn.Modules (their parameters, paired in order), sequences of tensors of equal
    shapes pairwise, or single tensors. Every tensor on one device; dtypes float16, bfloat16,
    float32 or float64, and a target may be wider than its online tensor (fp32 EMA of bf16).
    backend: "auto", "cuda", "triton" (flat buffers only, see flatten_parameters), "cpu" or "torch".
    Input is checked in full before any tensor is written.
    """
    target, online = _as_tensor_list("target", target), _as_tensor_list("online", online)
    _check_inputs(target, online, momentum, backend)
    momentum_update_op(target, online, float(momentum), backend)


@torch.no_grad()
def flatten_parameters(module):
    """Move every parameter of `module` into one new contiguous buffer and return it (1-D).

    Each parameter keeps its identity and values; only its storage changes (p.data becomes a
    view of the buffer, in module.parameters() order), so an optimizer built before or after
    still updates it. The layout backend='triton' needs: call it on the online and the target
    module alike. All parameters must share one dtype and one device.
    """
    params = list(module.parameters())
    if not params:
        raise ValueError("module has no parameters to flatten")
    first = params[0]
    for i, p in enumerate(params):
        if p.dtype != first.dtype:
            raise TypeError(f"every parameter must have one dtype to share a buffer: parameter {i} is "
                            f"{p.dtype}, parameter 0 {first.dtype}")
        if p.device != first.device:
            raise ValueError(f"every parameter must be on one device: parameter {i} is on {p.device}, "
                             f"parameter 0 on {first.device}")
    flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        view = flat[offset:offset + p.numel()].view(p.shape)
        view.copy_(p)
        p.data = view
        offset += p.numel()
    return flat
