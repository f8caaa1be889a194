// NT-Xent forward and backward on the CPU, without any 2N x 2N buffer.
//
// The losses of `rows` (2N x D: views a then b) are taken against the negatives `cols`
// (C x D), in which row r sits at column offset + r. A single process passes cols = rows and
// offset 0; torch.distributed passes every rank's rows as cols (contrastive_kernels/distributed.py).
//
// Both are cut into tiles of kTile rows, and each tile pair (I of rows, J of cols) takes one
// GEMM (MKL or OpenBLAS through at::addmm_out):
//   forward:  online log-sum-exp of rows I along the tile's rows, merged into the per-row
//             (max, sum) state;
//   backward: W_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j), the symmetric form of
//             DESIGN section 2, then dz_I += W z_J.
// When cols is rows, s is symmetric: only the pairs I <= J are computed, and each tile also
// serves, transposed, the rows of J (column-wise log-sum-exp; dz_J += W^T z_I). That is half
// the similarity GEMMs of a plain blocked loop: 1.5 full GEMMs for forward plus backward
// together, against 3 for eager PyTorch.
//
// Tile pairs are shared out among at::get_num_threads() workers; each GEMM runs on one
// thread. Results go into the shared per-row state under one mutex per row block, so memory
// stays O((2N + C) * D + threads * kTile * (kTile + D)). float32 and float64; float16 and
// bfloat16 are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "fast_exp.h"

namespace contrastive_kernels::cpu {
namespace {

// 256 x 256 float32 similarities are 256 KiB, which stays in a core's L2 next to the two
// 256 x D row blocks; measured here at D=128 a 256-row GEMM runs at ~125 GFLOP/s on one core.
constexpr int64_t kTile = 256;

struct TilePair {
  int64_t row_block, col_block;
};

int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// Symmetric: the pairs I <= J. Otherwise every (I, J).
std::vector<TilePair> tile_pairs(int64_t row_blocks, int64_t col_blocks, bool symmetric) {
  std::vector<TilePair> pairs;
  for (int64_t i = 0; i < row_blocks; ++i)
    for (int64_t j = symmetric ? i : 0; j < col_blocks; ++j) pairs.push_back({i, j});
  return pairs;
}

at::ScalarType compute_type(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The operands of one call, in the compute type and contiguous.
struct Operands {
  at::Tensor rows, cols;
  int64_t offset;
  bool symmetric;  // cols is rows (offset 0): s is symmetric
  int64_t n_rows() const { return rows.size(0); }
  int64_t dim() const { return rows.size(1); }
};

Operands make_operands(const at::Tensor& rows_in, const at::Tensor& cols_in, int64_t offset) {
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.size(0) >= 2 && rows_in.size(0) % 2 == 0 &&
                  rows_in.size(1) >= 1,
              "ntxent: rows must be (2N, D) with N, D >= 1, got ", rows_in.sizes());
  TORCH_CHECK(at::isFloatingType(rows_in.scalar_type()), "ntxent: rows must be floating point");
  TORCH_CHECK(cols_in.dim() == 2 && cols_in.size(1) == rows_in.size(1),
              "ntxent: cols must be (C, D) with the D of rows, got ", cols_in.sizes());
  TORCH_CHECK(offset >= 0 && offset + rows_in.size(0) <= cols_in.size(0),
              "ntxent: rows must sit inside cols, got offset ", offset, " for ", rows_in.size(0),
              " rows and ", cols_in.size(0), " cols");
  const bool symmetric = offset == 0 && cols_in.is_same(rows_in);
  // detach: the Python op owns autograd, and grad mode does not reach the worker threads.
  const at::Tensor rows = rows_in.detach().to(compute_type(rows_in)).contiguous();
  const at::Tensor cols = symmetric ? rows : cols_in.detach().to(rows.scalar_type()).contiguous();
  return {rows, cols, offset, symmetric};
}

// Scratch of one worker: a similarity tile and, for the backward, two (kTile x D) GEMM outputs.
struct Workspace {
  at::Tensor tile, out_rows, out_cols;
  Workspace(const at::Tensor& z, bool with_outputs)
      : tile(at::empty({kTile * kTile}, z.options())) {
    if (with_outputs) {
      out_rows = at::empty({kTile, z.size(1)}, z.options());
      out_cols = at::empty({kTile, z.size(1)}, z.options());
    }
  }
};

// Runs body(pair, workspace) for every tile pair, spread over the ATen threads (round robin,
// as every tile costs the same).
template <typename Body>
void for_each_tile_pair(const Operands& op, bool with_outputs, Body body) {
  const auto pairs = tile_pairs(num_tiles(op.n_rows()), num_tiles(op.cols.size(0)), op.symmetric);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), pairs.size());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      Workspace ws(op.rows, with_outputs);
      for (size_t p = worker; p < pairs.size(); p += workers) body(pairs[p], ws);
    }
  });
}

// s = inv_temperature * rows[I] @ cols[J]^T into a (kTile x kTile) scratch tile.
at::Tensor similarity_tile(const Operands& op, const TilePair& pair, double inv_temperature,
                           at::Tensor& scratch) {
  const int64_t r0 = pair.row_block * kTile, c0 = pair.col_block * kTile;
  const int64_t rows = std::min(kTile, op.n_rows() - r0), cols = std::min(kTile, op.cols.size(0) - c0);
  at::Tensor s = scratch.narrow(0, 0, rows * cols).view({rows, cols});
  at::addmm_out(s, s, op.rows.narrow(0, r0, rows), op.cols.narrow(0, c0, cols).t(), /*beta=*/0,
                /*alpha=*/inv_temperature);
  return s;
}

// Sets the entries of a tile where column == offset + row (a row is not its own negative).
template <typename T>
void mask_self(T* s, int64_t rows, int64_t cols, int64_t first_self_col, T value) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = first_self_col + r;
    if (c >= 0 && c < cols) s[r * cols + c] = value;
  }
}

// Merges a block's (max, sum of exp(s - max)) into a row's running (max, sum).
template <typename T>
inline void merge_lse(T& max, T& sum, T block_max, T block_sum) {
  if (block_max == -std::numeric_limits<T>::infinity()) return;
  const T new_max = std::max(max, block_max);
  sum = sum * std::exp(max - new_max) + block_sum * std::exp(block_max - new_max);
  max = new_max;
}

template <typename T>
void forward_impl(const Operands& op, double inv_temperature, at::Tensor& loss, at::Tensor& lse) {
  const int64_t n = op.n_rows(), half = n / 2, dim = op.dim();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> run_max(n, neg_inf), run_sum(n, T(0));
  std::vector<std::mutex> block_locks(num_tiles(n));

  for_each_tile_pair(op, /*with_outputs=*/false, [&](const TilePair& pair, Workspace& ws) {
    at::Tensor s_tile = similarity_tile(op, pair, inv_temperature, ws.tile);
    const int64_t rows = s_tile.size(0), cols = s_tile.size(1);
    const int64_t r0 = pair.row_block * kTile, c0 = pair.col_block * kTile;
    T* s = s_tile.data_ptr<T>();
    mask_self(s, rows, cols, op.offset + r0 - c0, neg_inf);

    // Rows of I: reduce along the tile's rows.
    std::vector<T> row_max(rows), row_sum(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      T mx = neg_inf, sum = 0;
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, sr[c]);
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += fast_exp(sr[c] - mx);
      row_max[r] = mx;
      row_sum[r] = sum;
    }
    // Symmetric, off the diagonal: the tile transposed serves the rows of J, reduced along the
    // tile's columns, vectorised over j.
    const bool mirrored = op.symmetric && pair.row_block != pair.col_block;
    std::vector<T> col_max(cols, neg_inf), col_sum(cols, T(0));
    if (mirrored) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* sr = s + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) col_max[c] = std::max(col_max[c], sr[c]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* sr = s + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) col_sum[c] += fast_exp(sr[c] - col_max[c]);
      }
    }
    {
      std::lock_guard<std::mutex> guard(block_locks[pair.row_block]);
      for (int64_t r = 0; r < rows; ++r) merge_lse(run_max[r0 + r], run_sum[r0 + r], row_max[r], row_sum[r]);
    }
    if (mirrored) {
      std::lock_guard<std::mutex> guard(block_locks[pair.col_block]);
      for (int64_t c = 0; c < cols; ++c) merge_lse(run_max[c0 + c], run_sum[c0 + c], col_max[c], col_sum[c]);
    }
  });

  const T* zp = op.rows.data_ptr<T>();
  T* loss_p = loss.data_ptr<T>();
  T* lse_p = lse.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* zi = zp + i * dim;
      const T* zpos = zp + ((i + half) % n) * dim;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < dim; ++k) dot += zi[k] * zpos[k];
      const T log_sum = std::log(run_sum[i]);
      lse_p[i] = run_max[i] + log_sum;
      // (max - positive) first: lse - positive cancels the digits of a small loss.
      loss_p[i] = (run_max[i] - dot * static_cast<T>(inv_temperature)) + log_sum;
    }
  });
}

template <typename T>
void backward_impl(const Operands& op, const at::Tensor& lse, const at::Tensor& grad,
                   double inv_temperature, at::Tensor& dz) {
  const int64_t n = op.n_rows(), half = n / 2, dim = op.dim();
  // One lse and upstream gradient per column; row r's are at column offset + r.
  const T* lse_p = lse.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  const T* lse_rows = lse_p + op.offset;
  const T* g_rows = g + op.offset;
  std::vector<std::mutex> block_locks(num_tiles(n));

  for_each_tile_pair(op, /*with_outputs=*/true, [&](const TilePair& pair, Workspace& ws) {
    at::Tensor w_tile = similarity_tile(op, pair, inv_temperature, ws.tile);
    const int64_t rows = w_tile.size(0), cols = w_tile.size(1);
    const int64_t r0 = pair.row_block * kTile, c0 = pair.col_block * kTile;
    T* w = w_tile.data_ptr<T>();
    const T* g_col = g + c0;
    const T* lse_col = lse_p + c0;
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = w + r * cols;
      const T g_row = g_rows[r0 + r], lse_row = lse_rows[r0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c)
        wr[c] = g_row * fast_exp(wr[c] - lse_row) + g_col[c] * fast_exp(wr[c] - lse_col[c]);
    }
    mask_self(w, rows, cols, op.offset + r0 - c0, T(0));

    at::Tensor part_rows = ws.out_rows.narrow(0, 0, rows);
    at::mm_out(part_rows, w_tile, op.cols.narrow(0, c0, cols));
    {
      std::lock_guard<std::mutex> guard(block_locks[pair.row_block]);
      dz.narrow(0, r0, rows).add_(part_rows);
    }
    if (op.symmetric && pair.row_block != pair.col_block) {
      at::Tensor part_cols = ws.out_cols.narrow(0, 0, cols);
      at::mm_out(part_cols, w_tile.t(), op.rows.narrow(0, r0, rows));
      std::lock_guard<std::mutex> guard(block_locks[pair.col_block]);
      dz.narrow(0, c0, cols).add_(part_cols);
    }
  });

  // The positive terms: -(g_i + g_p(i)) z_p(i), then the 1/T of ds/dz.
  const T* zp = op.rows.data_ptr<T>();
  T* dzp = dz.data_ptr<T>();
  const T scale = static_cast<T>(inv_temperature);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = (i + half) % n;
      const T gp = g_rows[i] + g_rows[p];
      const T* zpos = zp + p * dim;
      T* out = dzp + i * dim;
#pragma omp simd
      for (int64_t k = 0; k < dim; ++k) out[k] = scale * (out[k] - gp * zpos[k]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ntxent_fwd(const at::Tensor& rows, const at::Tensor& cols,
                                              int64_t offset, double inv_temperature) {
  const Operands op = make_operands(rows, cols, offset);
  at::Tensor loss = at::empty({op.n_rows()}, op.rows.options());
  at::Tensor lse = at::empty({op.n_rows()}, op.rows.options());
  AT_DISPATCH_FLOATING_TYPES(op.rows.scalar_type(), "ntxent_fwd_cpu",
                             [&] { forward_impl<scalar_t>(op, inv_temperature, loss, lse); });
  return {loss, lse};
}

at::Tensor ntxent_bwd(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& lse_in,
                      const at::Tensor& grad_in, int64_t offset, double inv_temperature) {
  const Operands op = make_operands(rows, cols, offset);
  const at::Tensor lse = lse_in.detach().to(op.rows.scalar_type()).contiguous();
  const at::Tensor grad = grad_in.detach().to(op.rows.scalar_type()).contiguous();
  TORCH_CHECK(lse.numel() == op.cols.size(0) && grad.numel() == op.cols.size(0),
              "ntxent_bwd: lse and grad need one value per column");
  at::Tensor dz = at::zeros_like(op.rows);
  AT_DISPATCH_FLOATING_TYPES(op.rows.scalar_type(), "ntxent_bwd_cpu",
                             [&] { backward_impl<scalar_t>(op, lse, grad, inv_temperature, dz); });
  return dz;
}

}  // namespace
}  // namespace contrastive_kernels::cpu

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("ntxent_fwd", &contrastive_kernels::cpu::ntxent_fwd);
  m.impl("ntxent_bwd", &contrastive_kernels::cpu::ntxent_bwd);
}
