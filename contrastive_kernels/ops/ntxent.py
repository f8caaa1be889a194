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
def _ntxent_fwd_kernel(Z, LSE, LOSS, n_rows, half, dim, stride_row, stride_col, inv_temp,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    # int64 row indices: 2N * D can pass 2^31 at the sizes this kernel is for.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    z_rows = tl.load(Z + rows[:, None] * stride_row + dims[None, :] * stride_col,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    partner = tl.where(rows < half, rows + half, rows - half)

    # A finite start for the running max keeps exp(m_old - m_new) free of inf - inf.
    run_max = tl.full([BLOCK_M], -1.0e30, dtype=ACC)
    run_sum = tl.zeros([BLOCK_M], dtype=ACC)
    positive = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(0, n_rows, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_rows
        z_cols = tl.load(Z + cols[:, None] * stride_row + dims[None, :] * stride_col,
                         mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(z_rows, tl.trans(z_cols), input_precision=DOT_PRECISION,
                   out_dtype=ACC) * inv_temp
        positive += tl.sum(tl.where(cols[None, :] == partner[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
    log_sum = tl.log(run_sum)
    tl.store(LSE + rows, run_max + log_sum, mask=row_ok)
    # (max - positive) first: both are near 1/T when the positive dominates, and lse - positive
    # would cancel away the small loss's digits.
    tl.store(LOSS + rows, (run_max - positive) + log_sum, mask=row_ok)


@triton.jit
def _ntxent_bwd_kernel(Z, LSE, GRAD, DZ, n_rows, half, dim, stride_row, stride_col,
                       stride_dz_row, stride_dz_col, inv_temp,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    # dz_i = (1/T) [ sum_j W_ij z_j - (g_i + g_p(i)) z_p(i) ],
    # W_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j) for j != i (the second term is P_ji,
    # by the symmetry of s), so this program needs only its own rows' outputs: no atomics.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    z_rows = tl.load(Z + rows[:, None] * stride_row + dims[None, :] * stride_col,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    lse_rows = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g_rows = tl.load(GRAD + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, n_rows, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_rows
        z_cols = tl.load(Z + cols[:, None] * stride_row + dims[None, :] * stride_col,
                         mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        lse_cols = tl.load(LSE + cols, mask=col_ok, other=0.0)
        g_cols = tl.load(GRAD + cols, mask=col_ok, other=0.0)
        s = tl.dot(z_rows, tl.trans(z_cols), input_precision=DOT_PRECISION,
                   out_dtype=ACC) * inv_temp
        w = (g_rows[:, None] * tl.exp(s - lse_rows[:, None])
             + g_cols[None, :] * tl.exp(s - lse_cols[None, :]))
        w = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), w, 0.0)
        # W goes into the second GEMM in the input dtype (as flash-attention does with P).
        acc += tl.dot(w.to(z_cols.dtype), z_cols, input_precision=DOT_PRECISION,
                      out_dtype=ACC)

    partner = tl.where(rows < half, rows + half, rows - half)
    z_partner = tl.load(Z + partner[:, None] * stride_row + dims[None, :] * stride_col,
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    g_partner = tl.load(GRAD + partner, mask=row_ok, other=0.0)
    acc -= (g_rows + g_partner)[:, None] * z_partner.to(ACC)
    tl.store(DZ + rows[:, None] * stride_dz_row + dims[None, :] * stride_dz_col,
             (acc * inv_temp).to(DZ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _triton_forward(z, inv_temp):
    if z.shape[1] > TRITON_MAX_DIM:
        raise ValueError(f"backend='triton' supports D <= {TRITON_MAX_DIM}, got D={z.shape[1]}; "
                         "use backend='torch' (or 'cpu' on CPU tensors)")
    n_rows = z.shape[0]
    lse = torch.empty(n_rows, device=z.device, dtype=accumulate_dtype(z))
    loss = torch.empty_like(lse)
    config = triton_tile_config(z)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]),)
    _ntxent_fwd_kernel[grid](z, lse, loss, n_rows, n_rows // 2, z.shape[1], z.stride(0),
                             z.stride(1), inv_temp, **config)
    return loss, lse


def _triton_backward(z, lse, grad_rows, inv_temp):
    n_rows = z.shape[0]
    grad_rows = grad_rows.to(lse.dtype).contiguous()
    dz = torch.empty_like(z)
    config = triton_tile_config(z)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]),)
    _ntxent_bwd_kernel[grid](z, lse, grad_rows, dz, n_rows, n_rows // 2, z.shape[1],
                             z.stride(0), z.stride(1), dz.stride(0), dz.stride(1), inv_temp,
                             **config)
    return dz


def _torch_chunk_rows(z):
    # A chunk holds (chunk x 2N) similarities, two such buffers at a time: keep each near
    # 1M values (4 MB in fp32), large enough that the chunk GEMMs still run at full speed.
    return max(1, min(z.shape[0], (1 << 20) // z.shape[0]))


def _torch_forward(z, inv_temp):
    zc = z.to(accumulate_dtype(z))
    n_rows = zc.shape[0]
    row_max = torch.empty(n_rows, device=z.device, dtype=zc.dtype)
    log_sum = torch.empty_like(row_max)
    chunk = _torch_chunk_rows(zc)
    for start in range(0, n_rows, chunk):
        s = (zc[start:start + chunk] @ zc.T).mul_(inv_temp)
        rows = torch.arange(s.shape[0], device=z.device)
        s[rows, rows + start] = float("-inf")
        m = s.amax(dim=1)
        row_max[start:start + chunk] = m
        log_sum[start:start + chunk] = s.sub_(m[:, None]).exp_().sum(dim=1).log_()
    positive = (zc * zc.roll(n_rows // 2, dims=0)).sum(dim=1) * inv_temp
    return (row_max - positive) + log_sum, row_max + log_sum  # see the forward kernel on why


def _torch_backward(z, lse, grad_rows, inv_temp):
    zc = z.to(lse.dtype)
    g = grad_rows.to(lse.dtype)
    n_rows = zc.shape[0]
    dz = torch.empty_like(zc)
    chunk = _torch_chunk_rows(zc)
    for start in range(0, n_rows, chunk):
        s = (zc[start:start + chunk] @ zc.T).mul_(inv_temp)
        stop = start + s.shape[0]
        w = (s - lse[start:stop, None]).exp_().mul_(g[start:stop, None])  # g_i P_ij
        w += s.sub_(lse).exp_().mul_(g)                                    # g_j P_ji, in s's buffer
        rows = torch.arange(s.shape[0], device=z.device)
        w[rows, rows + start] = 0.0
        torch.mm(w, zc, out=dz[start:stop])
    partner_g = (g + g.roll(n_rows // 2)).unsqueeze(1)
    return ((dz - partner_g * zc.roll(n_rows // 2, dims=0)) * inv_temp).to(z.dtype)


def _native_forward(z, inv_temp):
    return torch.ops.contrastive_kernels.ntxent_fwd(z, inv_temp)


def _native_backward(z, lse, grad_rows, inv_temp):
    return torch.ops.contrastive_kernels.ntxent_bwd(z, lse, grad_rows, inv_temp).to(z.dtype)


_FORWARD = {"triton": _triton_forward, "cuda": _native_forward, "cpu": _native_forward,
            "torch": _torch_forward}
_BACKWARD = {"triton": _triton_backward, "cuda": _native_backward, "cpu": _native_backward,
             "torch": _torch_backward}


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive_kernels::ntxent", mutates_args=())
def ntxent_rows(z: torch.Tensor, temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NT-Xent losses (in z's dtype) and log-sum-exps (float32, float64 for float64 z)."""
    chosen = resolve("fused_ntxent", backend, z.device, SUPPORTED_BACKENDS)
    loss, lse = _FORWARD[chosen](z, 1.0 / temperature)
    return loss.to(z.dtype), lse


@ntxent_rows.register_fake
def _(z, temperature, backend):
    rows = z.shape[0]
    return z.new_empty(rows), z.new_empty(rows, dtype=accumulate_dtype(z))


@torch.library.custom_op("contrastive_kernels::ntxent_backward", mutates_args=())
def ntxent_backward(z: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                    temperature: float, backend: str) -> torch.Tensor:
    """Gradient of sum_i grad_rows[i] * l_i with respect to z (z's dtype)."""
    chosen = resolve("fused_ntxent", backend, z.device, SUPPORTED_BACKENDS)
    return _BACKWARD[chosen](z, lse, grad_rows, 1.0 / temperature)


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


def fused_ntxent(z_a, z_b, temperature=0.5, *, normalize=True, reduction="mean", backend="auto"):
    """NT-Xent (SimCLR) loss of two views z_a, z_b (N x D each), without the 2N x 2N matrix.

    Same value as `contrastive_kernels.reference.ntxent` and lightly's NTXentLoss(temperature).
    reduction: "mean" (over the 2N rows), "sum" or "none" (shape (2N,)).
    backend: "auto" (the fastest available for the device), "triton", "cuda", "cpu" or "torch".
    """
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
