// NT-Xent forward and backward in CUDA C++, the same contract as csrc/cpu/ntxent.cpp: the
// losses of `rows` (2N x D) against the negatives `cols` (C x D), where row r is column
// offset + r (a single process passes cols = rows, offset 0).
//
// One block of 256 threads owns kRows rows and streams column tiles of kCols columns through
// shared memory (D in chunks of kChunk), so nothing of size 2N x C exists:
//   forward:  an online log-sum-exp per row (a warp per two rows), the positive picked out of
//             the tile where column == partner;
//   backward: W_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j) (P_ji by the symmetry of s),
//             dz_rows += W z_cols accumulated in shared memory, so each block writes only its
//             own rows: no atomics.
// CUDA cores and fp32 (fp64 for double) accumulation; no tensor cores: the Triton backend is the
// fast GPU path and `auto` prefers it. D <= 1024 (the backward's accumulator lives in shared
// memory). Status: compiled for sm_80/sm_90 in CI; its tests (marked gpu) run only on a GPU.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace contrastive_kernels::cuda {
namespace {

constexpr int kRows = 16;    // rows of z per block: 8 warps x 2 rows in the forward reductions
constexpr int kCols = 64;    // columns per tile: 2 per lane in the forward reductions
constexpr int kChunk = 32;   // D per shared-memory chunk
constexpr int kThreads = 256;
constexpr int64_t kMaxDim = 1024;

__device__ inline float device_exp(float x) { return __expf(x); }
__device__ inline double device_exp(double x) { return exp(x); }
__device__ inline float device_log(float x) { return __logf(x); }
__device__ inline double device_log(double x) { return log(x); }

template <typename T>
__device__ inline T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
struct TileBuffers {
  acc_t rows[kRows][kChunk + 1];  // +1: no bank conflicts when lanes walk different rows
  acc_t cols[kCols][kChunk + 1];
  acc_t s[kRows][kCols + 1];
};

// Loads rows [first, first + count) of z, dims [k0, k0 + kChunk), zero-padded, into dst.
template <typename scalar_t, typename acc_t, int count>
__device__ void load_chunk(const scalar_t* z, int64_t n, int64_t dim, int64_t first, int64_t k0,
                           acc_t (*dst)[kChunk + 1]) {
  for (int i = threadIdx.x; i < count * kChunk; i += kThreads) {
    const int r = i / kChunk, k = i % kChunk;
    const int64_t row = first + r, col = k0 + k;
    dst[r][k] = (row < n && col < dim) ? static_cast<acc_t>(z[row * dim + col]) : acc_t(0);
  }
}

// buf.s = inv_temp * rows[row0 : row0 + kRows] @ cols[col0 : col0 + kCols]^T. Each thread
// computes 4 entries: row tid / 16, columns tid % 16 + 16 q.
template <typename scalar_t, typename acc_t>
__device__ void similarity_tile(const scalar_t* z, int64_t n, const scalar_t* cols, int64_t n_cols,
                                int64_t dim, int64_t row0, int64_t col0, acc_t inv_temp,
                                TileBuffers<acc_t>& buf) {
  const int r = threadIdx.x / 16, c_first = threadIdx.x % 16;
  acc_t partial[4] = {0, 0, 0, 0};
  for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
    __syncthreads();  // the previous chunk (or the previous tile's readers of buf.s) are done
    load_chunk<scalar_t, acc_t, kRows>(z, n, dim, row0, k0, buf.rows);
    load_chunk<scalar_t, acc_t, kCols>(cols, n_cols, dim, col0, k0, buf.cols);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = c_first + 16 * q;
      acc_t dot = 0;
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) dot += buf.rows[r][k] * buf.cols[c][k];
      partial[q] += dot;
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) buf.s[r][c_first + 16 * q] = partial[q] * inv_temp;
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ntxent_fwd_kernel(const scalar_t* __restrict__ z, int64_t n,
                                                               const scalar_t* __restrict__ cols,
                                                               int64_t n_cols, int64_t offset,
                                                               int64_t dim, acc_t inv_temp,
                                                               acc_t* __restrict__ loss, acc_t* __restrict__ lse) {
  __shared__ TileBuffers<acc_t> buf;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows, half = n / 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t run_max[2] = {neg_inf, neg_inf}, run_sum[2] = {0, 0}, positive[2] = {0, 0};

  for (int64_t col0 = 0; col0 < n_cols; col0 += kCols) {
    similarity_tile(z, n, cols, n_cols, dim, row0, col0, inv_temp, buf);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = 2 * warp + j;
      const int64_t row = row0 + r, partner = offset + (row < half ? row + half : row - half);
      acc_t v[2], tile_max = neg_inf;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int64_t col = col0 + lane + 32 * q;
        const acc_t x = buf.s[r][lane + 32 * q];
        if (col == partner) positive[j] += x;
        v[q] = (col < n_cols && col != offset + row) ? x : neg_inf;
        tile_max = v[q] > tile_max ? v[q] : tile_max;
      }
      tile_max = warp_max(tile_max);
      if (tile_max == neg_inf) continue;  // warp-uniform: nothing in this tile for this row
      const acc_t tile_sum = warp_sum(device_exp(v[0] - tile_max) + device_exp(v[1] - tile_max));
      const acc_t new_max = run_max[j] > tile_max ? run_max[j] : tile_max;
      run_sum[j] = run_sum[j] * device_exp(run_max[j] - new_max) + tile_sum * device_exp(tile_max - new_max);
      run_max[j] = new_max;
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const acc_t pos = warp_sum(positive[j]);
    const int64_t row = row0 + 2 * warp + j;
    if (lane == 0 && row < n) {
      const acc_t log_sum = device_log(run_sum[j]);
      lse[row] = run_max[j] + log_sum;
      loss[row] = (run_max[j] - pos) + log_sum;  // lse - pos would cancel a small loss's digits
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ntxent_bwd_kernel(const scalar_t* __restrict__ z, int64_t n,
                                                               const scalar_t* __restrict__ cols,
                                                               int64_t n_cols, int64_t offset,
                                                               const acc_t* __restrict__ lse,
                                                               const acc_t* __restrict__ grad,
                                                               int64_t dim, acc_t inv_temp,
                                                               scalar_t* __restrict__ dz) {
  // lse and grad hold one value per column; row r's are at offset + r.
  __shared__ TileBuffers<acc_t> buf;
  __shared__ acc_t lse_rows[kRows], g_rows[kRows];
  extern __shared__ unsigned char dynamic_smem[];
  acc_t* acc = reinterpret_cast<acc_t*>(dynamic_smem);  // kRows x dim
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows, half = n / 2;

  for (int64_t i = threadIdx.x; i < kRows * dim; i += kThreads) acc[i] = 0;
  if (threadIdx.x < kRows) {
    const int64_t row = row0 + threadIdx.x;
    lse_rows[threadIdx.x] = row < n ? lse[offset + row] : acc_t(0);
    g_rows[threadIdx.x] = row < n ? grad[offset + row] : acc_t(0);
  }

  for (int64_t col0 = 0; col0 < n_cols; col0 += kCols) {
    similarity_tile(z, n, cols, n_cols, dim, row0, col0, inv_temp, buf);
    for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {  // s -> W, in place
      const int r = i / kCols, c = i % kCols;
      const int64_t row = row0 + r, col = col0 + c;
      const acc_t s = buf.s[r][c];
      buf.s[r][c] = (row < n && col < n_cols && col != offset + row)
                        ? g_rows[r] * device_exp(s - lse_rows[r]) + grad[col] * device_exp(s - lse[col])
                        : acc_t(0);
    }
    for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {  // acc += W @ z[cols]
      __syncthreads();
      load_chunk<scalar_t, acc_t, kCols>(cols, n_cols, dim, col0, k0, buf.cols);
      __syncthreads();
      for (int i = threadIdx.x; i < kRows * kChunk; i += kThreads) {
        const int r = i / kChunk, k = i % kChunk;
        if (k0 + k >= dim) continue;
        acc_t sum = 0;
#pragma unroll 8
        for (int c = 0; c < kCols; ++c) sum += buf.s[r][c] * buf.cols[c][k];
        acc[r * dim + k0 + k] += sum;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < kRows * dim; i += kThreads) {
    const int r = static_cast<int>(i / dim);
    const int64_t k = i % dim, row = row0 + r;
    if (row >= n) continue;
    const int64_t partner = row < half ? row + half : row - half;
    const acc_t pull = (g_rows[r] + grad[offset + partner]) * static_cast<acc_t>(z[partner * dim + k]);
    dz[row * dim + k] = static_cast<scalar_t>(inv_temp * (acc[i] - pull));
  }
}

void check_input(const at::Tensor& z, const at::Tensor& cols, int64_t offset) {
  TORCH_CHECK(z.is_cuda() && cols.is_cuda(), "ntxent (cuda): z and cols must be CUDA tensors");
  TORCH_CHECK(z.dim() == 2 && z.size(0) >= 2 && z.size(0) % 2 == 0 && z.size(1) >= 1,
              "ntxent (cuda): z must be (2N, D) with N, D >= 1, got ", z.sizes());
  TORCH_CHECK(z.size(1) <= kMaxDim, "ntxent (cuda): D <= ", kMaxDim, " supported, got ", z.size(1));
  TORCH_CHECK(cols.dim() == 2 && cols.size(1) == z.size(1) && cols.scalar_type() == z.scalar_type(),
              "ntxent (cuda): cols must be (C, D) with the D and dtype of z, got ", cols.sizes());
  TORCH_CHECK(offset >= 0 && offset + z.size(0) <= cols.size(0),
              "ntxent (cuda): z must sit inside cols, got offset ", offset);
}

unsigned int num_blocks(int64_t n) { return static_cast<unsigned int>((n + kRows - 1) / kRows); }

std::tuple<at::Tensor, at::Tensor> ntxent_fwd(const at::Tensor& z_in, const at::Tensor& cols_in,
                                              int64_t offset, double inv_temperature) {
  check_input(z_in, cols_in, offset);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.detach().contiguous();
  const at::Tensor cols = cols_in.detach().contiguous();
  const int64_t n = z.size(0), dim = z.size(1);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, z.options().dtype(acc_type));
  at::Tensor lse = at::empty({n}, z.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ntxent_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ntxent_fwd_kernel<scalar_t, acc_t><<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), n, cols.data_ptr<scalar_t>(), cols.size(0), offset, dim,
        static_cast<acc_t>(inv_temperature), loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

at::Tensor ntxent_bwd(const at::Tensor& z_in, const at::Tensor& cols_in, const at::Tensor& lse_in,
                      const at::Tensor& grad_in, int64_t offset, double inv_temperature) {
  check_input(z_in, cols_in, offset);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.detach().contiguous();
  const at::Tensor cols = cols_in.detach().contiguous();
  const int64_t n = z.size(0), dim = z.size(1);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = lse_in.detach().to(acc_type).contiguous();
  const at::Tensor grad = grad_in.detach().to(acc_type).contiguous();
  TORCH_CHECK(lse.numel() == cols.size(0) && grad.numel() == cols.size(0),
              "ntxent_bwd (cuda): one lse and grad per column");
  at::Tensor dz = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ntxent_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const size_t smem = sizeof(acc_t) * kRows * dim;
    auto kernel = ntxent_bwd_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<num_blocks(n), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), n, cols.data_ptr<scalar_t>(), cols.size(0), offset,
        lse.data_ptr<acc_t>(), grad.data_ptr<acc_t>(), dim, static_cast<acc_t>(inv_temperature),
        dz.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

}  // namespace
}  // namespace contrastive_kernels::cuda

TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
  m.impl("ntxent_fwd", &contrastive_kernels::cuda::ntxent_fwd);
  m.impl("ntxent_bwd", &contrastive_kernels::cuda::ntxent_bwd);
}
