"""Fused MoCo InfoNCE loss against a queue of negatives, without the N x (1 + K) logits.

pos_i = q_i . k_i / T, s_im = q_i . queue_m / T over the queue rows m in the window
(m - start) mod K < count (all rows for a plain tensor, the filled rows of a KeyQueue, read on
the device), and  l_i = -pos_i + log(exp(pos_i) + sum_m exp(s_im))  (DESIGN section 2), the
value of MoCo's cat([l_pos, l_neg]) / T + cross-entropy against label 0.

dl_i/dq_i = (1/T) [(P0_i - 1) k_i + sum_m P_im queue_m], dl_i/dk_i = (1/T)(P0_i - 1) q_i with P
the softmax over [pos_i, s_i.]. Every backend's forward, when a gradient will be wanted, also
accumulates W_i = sum_m P_im queue_m as flash attention accumulates its output (online
rescaling), so the backward is O(N*D) torch ops: two GEMMs over the queue in all, as many as
eager MoCo, and no N x K buffer. (A backward that recomputed the tiles would need a third.)

Backends (DESIGN section 4):
  triton  streams queue tiles with an online log-sum-exp (and W), one program per row block.
          fp32 accumulation (fp64 for fp64); tested under TRITON_INTERPRET=1 in fp64, fp32 and
          fp16; bf16 and compiled kernels need a GPU (tests marked `gpu`). D <= 1024.
  cpu     csrc/cpu/infonce.cpp: the queue split over threads in blocks, GEMMs per block.
  torch   pure PyTorch, chunked over the queue: O(N * chunk) memory.

q and k are L2-normalised (normalize=True) by torch ops around the registered op
`contrastive_kernels::infonce`; the queue rows are used as stored and never get a gradient.
"""
import torch
import torch.nn.functional as F

from .._backends import accumulate_dtype, resolve, tl, triton, triton_tile_config
from .._checks import check_loss_options, check_matrix, check_same
from .queue import KeyQueue

SUPPORTED_BACKENDS = ("triton", "cpu", "torch")
TRITON_MAX_DIM = 1024  # the forward keeps a BLOCK_M x D accumulator in registers


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _queue_tile(Q_ROWS, QUEUE, START, COUNT, queue_rows, dim, stride_queue_row, stride_queue_col,
                col0, inv_temp, dims, dim_ok, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ACC: tl.constexpr):
    """(similarities of this tile with the window's rows, -inf elsewhere; the tile's keys)."""
    cols = col0 + tl.arange(0, BLOCK_N).to(tl.int64)
    in_window = ((cols - START) % queue_rows + queue_rows) % queue_rows < COUNT
    col_ok = (cols < queue_rows) & in_window
    keys = tl.load(QUEUE + cols[:, None] * stride_queue_row + dims[None, :] * stride_queue_col,
                   mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    s = tl.dot(Q_ROWS, tl.trans(keys), input_precision=DOT_PRECISION, out_dtype=ACC) * inv_temp
    return tl.where(col_ok[None, :], s, float("-inf")), keys


@triton.jit
def _infonce_fwd_kernel(Q, K, QUEUE, START, COUNT, LSE, LOSS, WEIGHTED, n_rows, queue_rows, dim,
                        stride_row, stride_col, stride_queue_row, stride_queue_col, inv_temp,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, WITH_WEIGHTED: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    offsets = rows[:, None] * stride_row + dims[None, :] * stride_col
    mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + offsets, mask=mask, other=0.0)
    k = tl.load(K + offsets, mask=mask, other=0.0)
    positive = tl.sum(q.to(ACC) * k.to(ACC), axis=1) * inv_temp
    start = tl.load(START)
    count = tl.load(COUNT)

    # The positive is the first term of every row's sum: the running max starts there.
    run_max = positive
    run_sum = tl.full([BLOCK_M], 1.0, dtype=ACC)
    weighted = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)  # sum_m exp(s_im - run_max_i) queue_m
    for col0 in range(0, queue_rows, BLOCK_N):
        s, keys = _queue_tile(q, QUEUE, start, count, queue_rows, dim, stride_queue_row,
                              stride_queue_col, col0, inv_temp, dims, dim_ok, BLOCK_N,
                              DOT_PRECISION, ACC)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(s - new_max[:, None])  # -inf outside the window -> 0
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_max = new_max
        if WITH_WEIGHTED:
            # P goes into the GEMM in the input dtype, as flash-attention does.
            weighted = weighted * rescale[:, None] + tl.dot(p.to(keys.dtype), keys,
                                                            input_precision=DOT_PRECISION, out_dtype=ACC)
    log_sum = tl.log(run_sum)
    tl.store(LSE + rows, run_max + log_sum, mask=row_ok)
    tl.store(LOSS + rows, (run_max - positive) + log_sum, mask=row_ok)  # no lse - pos cancellation
    if WITH_WEIGHTED:
        tl.store(WEIGHTED + offsets, (weighted / run_sum[:, None]).to(WEIGHTED.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _triton_args(q, k, queue):
    if q.shape[1] > TRITON_MAX_DIM:
        raise ValueError(f"backend='triton' supports D <= {TRITON_MAX_DIM}, got D={q.shape[1]}")
    # q and k share strides so one offset grid serves both; the queue keeps its own.
    q, k = q.contiguous(), k.contiguous()
    return q, k, queue.to(q.dtype)


def _triton_forward(q, k, queue, start, count, inv_temp, with_weighted):
    q, k, queue = _triton_args(q, k, queue)
    n_rows = q.shape[0]
    lse = torch.empty(n_rows, device=q.device, dtype=accumulate_dtype(q))
    loss = torch.empty_like(lse)
    weighted = torch.empty((n_rows if with_weighted else 0, q.shape[1]), device=q.device, dtype=lse.dtype)
    config = triton_tile_config(q)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]),)
    _infonce_fwd_kernel[grid](q, k, queue, start, count, lse, loss, weighted, n_rows, queue.shape[0],
                              q.shape[1], q.stride(0), q.stride(1), queue.stride(0), queue.stride(1), inv_temp,
                              WITH_WEIGHTED=with_weighted, **config)
    return loss, lse, weighted


def _torch_forward(q, k, queue, start, count, inv_temp, with_weighted):
    qc, kc = q.to(accumulate_dtype(q)), k.to(accumulate_dtype(q))
    positive = (qc * kc).sum(dim=1) * inv_temp
    row_max, row_sum = positive.clone(), torch.ones_like(positive)
    weighted = torch.zeros_like(qc) if with_weighted else qc.new_empty(0, qc.shape[1])
    size = queue.shape[0]
    chunk = max(1, (1 << 20) // qc.shape[0])  # (N x chunk) similarities: ~1M values
    for first in range(0, size, chunk):
        keys = queue[first:first + chunk].to(qc.dtype)
        s = (qc @ keys.T).mul_(inv_temp)
        outside = (torch.arange(first, first + keys.shape[0], device=q.device) - start).remainder(size) >= count
        s.masked_fill_(outside, float("-inf"))
        new_max = torch.maximum(row_max, s.amax(dim=1))
        rescale = (row_max - new_max).exp_()
        p = s.sub_(new_max[:, None]).exp_()
        row_sum = row_sum * rescale + p.sum(dim=1)
        row_max = new_max
        if with_weighted:
            weighted.mul_(rescale[:, None]).addmm_(p, keys)
    log_sum = row_sum.log()
    if with_weighted:
        weighted /= row_sum[:, None]
    return (row_max - positive) + log_sum, row_max + log_sum, weighted


def _native_forward(q, k, queue, start, count, inv_temp, with_weighted):
    return torch.ops.contrastive_kernels.infonce_fwd(q, k, queue, start, count, inv_temp, with_weighted)


_FORWARD = {"triton": _triton_forward, "cpu": _native_forward, "torch": _torch_forward}


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive_kernels::infonce", mutates_args=())
def infonce_rows(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, start: torch.Tensor,
                 count: torch.Tensor, temperature: float, with_weighted: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE losses (q's dtype), log-sum-exps and, if with_weighted, the softmax-weighted
    queue sums W (N x D, else 0 x D); both float32, float64 for float64 q."""
    chosen = resolve("fused_infonce", backend, q.device, SUPPORTED_BACKENDS)
    loss, lse, weighted = _FORWARD[chosen](q, k, queue, start, count, 1.0 / temperature, with_weighted)
    return loss.to(q.dtype), lse, weighted


@infonce_rows.register_fake
def _(q, k, queue, start, count, temperature, with_weighted, backend):
    acc = accumulate_dtype(q)
    return (q.new_empty(q.shape[0]), q.new_empty(q.shape[0], dtype=acc),
            q.new_empty((q.shape[0] if with_weighted else 0, q.shape[1]), dtype=acc))


def _setup_context(ctx, inputs, output):
    q, k, _, _, _, temperature, _, _ = inputs
    ctx.save_for_backward(q, k, output[1], output[2])
    ctx.temperature = temperature


def _backward(ctx, grad_loss, grad_lse, grad_weighted):
    q, k, lse, weighted = ctx.saved_tensors
    if weighted.shape[0] != q.shape[0]:
        raise RuntimeError("fused_infonce ran its forward without a gradient in view (grad mode off, or "
                           "neither q nor k requiring grad), so it kept nothing to differentiate")
    inv_temp = 1.0 / ctx.temperature
    qc, kc = q.to(lse.dtype), k.to(lse.dtype)
    g = (torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype)) * inv_temp
    coef = ((qc * kc).sum(dim=1) * inv_temp - lse).exp() - 1.0  # d l_i / d pos_i = P0_i - 1
    grad_q = (weighted + coef[:, None] * kc) * g[:, None]
    grad_k = qc * (coef * g)[:, None]
    return grad_q.to(q.dtype), grad_k.to(k.dtype), None, None, None, None, None, None


infonce_rows.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------
def _check_inputs(q, k, queue, temperature, normalize, reduction, backend):
    check_matrix("q", q)
    check_matrix("k", k)
    check_matrix("queue", queue, what="a torch.Tensor or KeyQueue")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue rows must have D={q.shape[1]} like q, got shape {tuple(queue.shape)}")
    check_same("q", q, "k", k)
    check_same("q", q, "queue", queue)
    check_loss_options(temperature, normalize, reduction, backend)


def fused_infonce(q, k, queue, temperature=0.07, *, normalize=True, reduction="mean", backend="auto"):
    """MoCo's InfoNCE loss of queries q (N x D) with positive keys k (N x D) against `queue`
    (a (K, D) tensor, or a KeyQueue whose filled rows are the negatives), without the N x (1+K)
    logits. Same value as `contrastive_kernels.reference.infonce`. Gradients reach q and k,
    never the queue. reduction: "mean", "sum" or "none" (shape (N,))."""
    if isinstance(queue, KeyQueue):
        queue_rows, (start, count) = queue.buffer, queue.window()
    else:
        queue_rows = queue
        start = count = None
    _check_inputs(q, k, queue_rows, temperature, normalize, reduction, backend)
    if start is None:  # a plain tensor: every row is a negative
        start = torch.zeros((), dtype=torch.int64, device=q.device)
        count = torch.full((), queue_rows.shape[0], dtype=torch.int64, device=q.device)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    with_weighted = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    rows, _, _ = infonce_rows(q, k, queue_rows.detach(), start, count, float(temperature), with_weighted,
                              backend)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
