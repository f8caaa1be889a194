"""Fused NT-Xent (SimCLR) loss that never builds the 2N x 2N similarity matrix.

z = cat(z_a, z_b) (2N x D, L2-normalised if asked), s_ij = z_i . z_j / T, positive of row i
at p(i) = (i + N) mod 2N:  l_i = -s_{i,p(i)} + logsumexp_{j != i} s_ij  (DESIGN section 2).

Backends (DESIGN section 4):
  triton  forward streams column tiles with an online log-sum-exp and saves the per-row LSE;
          backward recomputes the tiles and, because s is symmetric (P_ji = exp(s_ij - lse_j)),
          every program owns its rows: no atomics, no N x N buffer. fp32 accumulation; fp32,
          fp16 and bf16 inputs (and float64, accumulated in float64, for gradcheck under the
          interpreter); int64 offsets. D <= 1024. Tested under TRITON_INTERPRET=1 on CPU tensors in fp64, fp32
          and fp16; bf16 and the compiled kernels need a GPU (tests marked `gpu`).
  cuda    csrc/cuda/ntxent.cu: the same streaming algorithm on CUDA cores (no tensor cores);
          compiled in CI, run only where a GPU is lent. D <= 1024.
  cpu     csrc/cpu/ntxent.cpp: upper-triangle tiles, one GEMM per tile pair, multi-threaded.
  torch   pure PyTorch, chunked over rows: O(chunk * N) memory; the fallback anywhere.

The L2 normalisation and the concatenation are O(N*D) torch ops around the registered op
`contrastive_kernels::ntxent`, so autograd chains their gradients; the op returns per-row
losses and the reduction is applied after it.
"""
import torch
import torch.nn.functional as F

from .._backends import accumulate_dtype, resolve, tl, triton, triton_tile_config
from .._checks import check_loss_options, check_matrix, check_same

SUPPORTED_BACKENDS = ("triton", "cuda", "cpu", "torch")
TRITON_MAX_DIM = 1024  # the backward keeps a BLOCK_M x D fp32 accumulator in registers


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _ntxent_fwd_kernel(ROWS, COLS, LSE, LOSS, n_rows, n_cols, offset, dim, stride_row, stride_col,
                       stride_c_row, stride_c_col, inv_temp,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    # Row r of ROWS is column offset + r of COLS (itself: not a negative); its positive is
    # column offset + partner(r). Single process: COLS is ROWS and offset is 0.
    # int64 row indices: 2N * D can pass 2^31 at the sizes this kernel is for.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    z_rows = tl.load(ROWS + rows[:, None] * stride_row + dims[None, :] * stride_col,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    half = n_rows // 2
    self_col = offset + rows
    partner_col = offset + tl.where(rows < half, rows + half, rows - half)

    # A finite start for the running max keeps exp(m_old - m_new) free of inf - inf.
    run_max = tl.full([BLOCK_M], -1.0e30, dtype=ACC)
    run_sum = tl.zeros([BLOCK_M], dtype=ACC)
    positive = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_cols
        z_cols = tl.load(COLS + cols[:, None] * stride_c_row + dims[None, :] * stride_c_col,
                         mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(z_rows, tl.trans(z_cols), input_precision=DOT_PRECISION,
                   out_dtype=ACC) * inv_temp
        positive += tl.sum(tl.where(cols[None, :] == partner_col[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (cols[None, :] != self_col[:, None]), s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
    log_sum = tl.log(run_sum)
    tl.store(LSE + rows, run_max + log_sum, mask=row_ok)
    # (max - positive) first: both are near 1/T when the positive dominates, and lse - positive
    # would cancel away the small loss's digits.
    tl.store(LOSS + rows, (run_max - positive) + log_sum, mask=row_ok)


@triton.jit
def _ntxent_bwd_kernel(ROWS, COLS, LSE, GRAD, DZ, n_rows, n_cols, offset, dim, stride_row,
                       stride_col, stride_c_row, stride_c_col, stride_dz_row, stride_dz_col,
                       inv_temp, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    # dz_i = (1/T) [ sum_j W_ij z_j - (g_i + g_p(i)) z_p(i) ],
    # W_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j) for j != i (the second term is P_ji,
    # by the symmetry of s), so this program needs only its own rows' outputs: no atomics.
    # LSE and GRAD hold one value per column; row r's are at offset + r.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    z_rows = tl.load(ROWS + rows[:, None] * stride_row + dims[None, :] * stride_col,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    self_col = offset + rows
    lse_rows = tl.load(LSE + self_col, mask=row_ok, other=0.0)
    g_rows = tl.load(GRAD + self_col, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_cols
        z_cols = tl.load(COLS + cols[:, None] * stride_c_row + dims[None, :] * stride_c_col,
                         mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        lse_cols = tl.load(LSE + cols, mask=col_ok, other=0.0)
        g_cols = tl.load(GRAD + cols, mask=col_ok, other=0.0)
        s = tl.dot(z_rows, tl.trans(z_cols), input_precision=DOT_PRECISION,
                   out_dtype=ACC) * inv_temp
        w = (g_rows[:, None] * tl.exp(s - lse_rows[:, None])
             + g_cols[None, :] * tl.exp(s - lse_cols[None, :]))
        w = tl.where(col_ok[None, :] & (cols[None, :] != self_col[:, None]), w, 0.0)
        # W goes into the second GEMM in the input dtype (as flash-attention does with P).
        acc += tl.dot(w.to(z_cols.dtype), z_cols, input_precision=DOT_PRECISION,
                      out_dtype=ACC)

    half = n_rows // 2
    partner = tl.where(rows < half, rows + half, rows - half)
    z_partner = tl.load(ROWS + partner[:, None] * stride_row + dims[None, :] * stride_col,
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    g_partner = tl.load(GRAD + offset + partner, mask=row_ok, other=0.0)
    acc -= (g_rows + g_partner)[:, None] * z_partner.to(ACC)
    tl.store(DZ + rows[:, None] * stride_dz_row + dims[None, :] * stride_dz_col,
             (acc * inv_temp).to(DZ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------
# Launchers. Each computes the losses of `rows` (2N x D, views a then b) against the negatives
# `cols` (C x D), in which row r of `rows` sits at column offset + r; the backward takes one
# lse and upstream gradient per column and returns d/d(rows) of sum_j grad_j l_j over every
# column j. A single process passes cols = rows, offset = 0; torch.distributed passes the
# rows of every rank (contrastive_kernels.distributed).
# ----------------------------------------------------------------------------------------
def _triton_forward(rows, cols, offset, inv_temp):
    if rows.shape[1] > TRITON_MAX_DIM:
        raise ValueError(f"backend='triton' supports D <= {TRITON_MAX_DIM}, got D={rows.shape[1]}; "
                         "use backend='torch' (or 'cpu' on CPU tensors)")
    n_rows = rows.shape[0]
    lse = torch.empty(n_rows, device=rows.device, dtype=accumulate_dtype(rows))
    loss = torch.empty_like(lse)
    config = triton_tile_config(rows)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]),)
    _ntxent_fwd_kernel[grid](rows, cols, lse, loss, n_rows, cols.shape[0], offset, rows.shape[1],
                             rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
                             inv_temp, **config)
    return loss, lse


def _triton_backward(rows, cols, lse_cols, grad_cols, offset, inv_temp):
    n_rows = rows.shape[0]
    grad_cols = grad_cols.to(lse_cols.dtype).contiguous()
    dz = torch.empty_like(rows)
    config = triton_tile_config(rows)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]),)
    _ntxent_bwd_kernel[grid](rows, cols, lse_cols.contiguous(), grad_cols, dz, n_rows,
                             cols.shape[0], offset, rows.shape[1], rows.stride(0), rows.stride(1),
                             cols.stride(0), cols.stride(1), dz.stride(0), dz.stride(1), inv_temp,
                             **config)
    return dz


def _torch_chunk_rows(rows, cols):
    # A chunk holds (chunk x C) similarities, two such buffers at a time: keep each near
    # 1M values (4 MB in fp32), large enough that the chunk GEMMs still run at full speed.
    return max(1, min(rows.shape[0], (1 << 20) // cols.shape[0]))


def _torch_forward(rows, cols, offset, inv_temp):
    zr, zc = rows.to(accumulate_dtype(rows)), cols.to(accumulate_dtype(rows))
    n_rows = zr.shape[0]
    row_max = torch.empty(n_rows, device=rows.device, dtype=zr.dtype)
    log_sum = torch.empty_like(row_max)
    chunk = _torch_chunk_rows(zr, zc)
    for start in range(0, n_rows, chunk):
        s = (zr[start:start + chunk] @ zc.T).mul_(inv_temp)
        local = torch.arange(s.shape[0], device=rows.device)
        s[local, local + offset + start] = float("-inf")
        m = s.amax(dim=1)
        row_max[start:start + chunk] = m
        log_sum[start:start + chunk] = s.sub_(m[:, None]).exp_().sum(dim=1).log_()
    positive = (zr * zr.roll(n_rows // 2, dims=0)).sum(dim=1) * inv_temp
    return (row_max - positive) + log_sum, row_max + log_sum  # see the forward kernel on why


def _torch_backward(rows, cols, lse_cols, grad_cols, offset, inv_temp):
    zr, zc = rows.to(lse_cols.dtype), cols.to(lse_cols.dtype)
    g = grad_cols.to(lse_cols.dtype)
    n_rows = zr.shape[0]
    g_rows, lse_rows = g[offset:offset + n_rows], lse_cols[offset:offset + n_rows]
    dz = torch.empty_like(zr)
    chunk = _torch_chunk_rows(zr, zc)
    for start in range(0, n_rows, chunk):
        s = (zr[start:start + chunk] @ zc.T).mul_(inv_temp)
        stop = start + s.shape[0]
        w = (s - lse_rows[start:stop, None]).exp_().mul_(g_rows[start:stop, None])  # g_i P_ij
        w += s.sub_(lse_cols).exp_().mul_(g)                                        # g_j P_ji, in s's buffer
        local = torch.arange(s.shape[0], device=rows.device)
        w[local, local + offset + start] = 0.0
        torch.mm(w, zc, out=dz[start:stop])
    partner_g = (g_rows + g_rows.roll(n_rows // 2)).unsqueeze(1)
    return ((dz - partner_g * zr.roll(n_rows // 2, dims=0)) * inv_temp).to(rows.dtype)


def _native_forward(rows, cols, offset, inv_temp):
    return torch.ops.contrastive_kernels.ntxent_fwd(rows, cols, offset, inv_temp)


def _native_backward(rows, cols, lse_cols, grad_cols, offset, inv_temp):
    return torch.ops.contrastive_kernels.ntxent_bwd(rows, cols, lse_cols, grad_cols, offset,
                                                    inv_temp).to(rows.dtype)


_FORWARD = {"triton": _triton_forward, "cuda": _native_forward, "cpu": _native_forward,
            "torch": _torch_forward}
_BACKWARD = {"triton": _triton_backward, "cuda": _native_backward, "cpu": _native_backward,
             "torch": _torch_backward}


def forward_against(rows, cols, offset, temperature, backend):
    """Per-row losses and log-sum-exps of `rows` against the negatives `cols` (see the launchers)."""
    chosen = resolve("fused_ntxent", backend, rows.device, SUPPORTED_BACKENDS)
    return _FORWARD[chosen](rows, cols, offset, 1.0 / temperature)


def backward_against(rows, cols, lse_cols, grad_cols, offset, temperature, backend):
    """d/d(rows) of sum_j grad_cols[j] * l_j over every column j (see the launchers)."""
    chosen = resolve("fused_ntxent", backend, rows.device, SUPPORTED_BACKENDS)
    return _BACKWARD[chosen](rows, cols, lse_cols, grad_cols, offset, 1.0 / temperature)


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive_kernels::ntxent", mutates_args=())
def ntxent_rows(z: torch.Tensor, temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NT-Xent losses (in z's dtype) and log-sum-exps (float32, float64 for float64 z)."""
    loss, lse = forward_against(z, z, 0, temperature, backend)
    return loss.to(z.dtype), lse


@ntxent_rows.register_fake
def _(z, temperature, backend):
    rows = z.shape[0]
    return z.new_empty(rows), z.new_empty(rows, dtype=accumulate_dtype(z))


@torch.library.custom_op("contrastive_kernels::ntxent_backward", mutates_args=())
def ntxent_backward(z: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                    temperature: float, backend: str) -> torch.Tensor:
    """Gradient of sum_i grad_rows[i] * l_i with respect to z (z's dtype)."""
    return backward_against(z, z, lse, grad_rows, 0, temperature, backend)


@ntxent_backward.register_fake
def _(z, lse, grad_rows, temperature, backend):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, temperature, backend = inputs
    ctx.save_for_backward(z, output[1])
    ctx.temperature, ctx.backend = temperature, backend


def _backward(ctx, grad_loss, grad_lse):
    z, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dz = ntxent_backward(z, lse, grad_loss, ctx.temperature, ctx.backend)
    return dz, None, None


ntxent_rows.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------
def _check_inputs(z_a, z_b, temperature, normalize, reduction, backend):
    check_matrix("z_a", z_a)
    check_matrix("z_b", z_b)
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    check_same("z_a", z_a, "z_b", z_b)
    check_loss_options(temperature, normalize, reduction, backend)


def fused_ntxent(z_a, z_b, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
                 group=None):
    """NT-Xent (SimCLR) loss of two views z_a, z_b (N x D each), without the 2N x 2N matrix.

    Same value as `contrastive_kernels.reference.ntxent` and lightly's NTXentLoss(temperature).
    reduction: "mean" (over the 2N rows), "sum" or "none" (shape (2N,)).
    backend: "auto" (the fastest available for the device), "triton", "cuda", "cpu" or "torch".
    group: a torch.distributed process group. Each rank passes its own rows and the negatives
    are the rows of every rank; the reduction is over this rank's rows, and the gradient follows
    DDP's convention (contrastive_kernels.distributed says how, and what it communicates).
    """
    if group is not None:
        from .. import distributed

        return distributed.ntxent(z_a, z_b, temperature, normalize, reduction, backend, group,
                                  lambda: _check_inputs(z_a, z_b, temperature, normalize, reduction, backend))
    _check_inputs(z_a, z_b, temperature, normalize, reduction, backend)
    z = torch.cat([z_a, z_b])
    if normalize:
        z = F.normalize(z, dim=1)
    rows, _ = ntxent_rows(z, float(temperature), backend)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
