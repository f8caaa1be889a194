// MoCo InfoNCE forward and backward on the CPU, without any N x K buffer.
//
// l_i = -pos_i + log(exp(pos_i) + sum_m exp(s_im)),  pos_i = q_i.k_i / T,  s_im = q_i.queue_m / T,
// over the queue rows m with (m - start) mod K < count (the filled rows of a KeyQueue).
// MoCo has few queries (N ~ 256) and many negatives (K ~ 65536), so the work is split over the
// queue (split-K): each worker takes blocks of kBlock queue rows, one GEMM per block for the
// similarities and, when a gradient is wanted, one more for sum_m P_im queue_m (accumulated with
// online rescaling, as flash attention's output). Per-row (max, sum, accumulator) partials are
// merged across workers with the positive at the end. The backward is then O(N*D) (Python):
// 2 GEMMs over the queue in all, as many as eager MoCo, and no N x K buffer.
// float32 and float64; float16/bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace contrastive_kernels::cpu {
namespace {

// 1024 queue rows x N=256 queries in float32 is 1 MiB of similarities: it stays in L2.
constexpr int64_t kBlock = 1024;

struct QueueWindow {
  int64_t size, start, count;
  bool all() const { return count >= size; }
  bool valid(int64_t row) const { return ((row - start) % size + size) % size < count; }
};

QueueWindow window(const at::Tensor& queue, const at::Tensor& start, const at::Tensor& count) {
  TORCH_CHECK(start.numel() == 1 && count.numel() == 1, "infonce: start and count must be scalars");
  return {queue.size(0), start.item<int64_t>(), count.item<int64_t>()};
}

// Runs body(first_row, rows, worker, scratch) over the queue blocks, round robin over the ATen
// threads; scratch is the worker's (N x kBlock) similarity buffer.
template <typename Body>
void for_each_queue_block(const at::Tensor& q, int64_t queue_rows, int64_t workers, Body body) {
  const int64_t blocks = (queue_rows + kBlock - 1) / kBlock;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      at::Tensor scratch = at::empty({q.size(0) * kBlock}, q.options());
      for (int64_t b = worker; b < blocks; b += workers)
        body(b * kBlock, std::min(kBlock, queue_rows - b * kBlock), worker, scratch);
    }
  });
}

int64_t num_workers(int64_t queue_rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (queue_rows + kBlock - 1) / kBlock));
}

// s = inv_temp * q @ queue[first : first + rows]^T, with the rows outside the window at -inf.
template <typename T>
at::Tensor similarity_block(const at::Tensor& q, const at::Tensor& queue, int64_t first, int64_t rows,
                            double inv_temperature, const QueueWindow& win, at::Tensor& scratch) {
  at::Tensor s = scratch.narrow(0, 0, q.size(0) * rows).view({q.size(0), rows});
  at::addmm_out(s, s, q, queue.narrow(0, first, rows).t(), /*beta=*/0, /*alpha=*/inv_temperature);
  if (!win.all()) {
    T* sp = s.data_ptr<T>();
    for (int64_t c = 0; c < rows; ++c)
      if (!win.valid(first + c))
        for (int64_t r = 0; r < q.size(0); ++r) sp[r * rows + c] = -std::numeric_limits<T>::infinity();
  }
  return s;
}

template <typename T>
std::vector<T> positives(const at::Tensor& q, const at::Tensor& k, double inv_temperature) {
  const int64_t n = q.size(0), dim = q.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  std::vector<T> pos(n);
  for (int64_t i = 0; i < n; ++i) {
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < dim; ++d) dot += qp[i * dim + d] * kp[i * dim + d];
    pos[i] = dot * static_cast<T>(inv_temperature);
  }
  return pos;
}

// Forward over the queue blocks. With `weighted` defined it also accumulates, as flash
// attention does for its output, sum_m P_im queue_m (P the softmax over the positive and the
// window): the whole of dq but for the positive's term, so the backward needs no second pass.
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, const QueueWindow& win,
                  double inv_temperature, at::Tensor& loss, at::Tensor& lse, at::Tensor& weighted) {
  const int64_t n = q.size(0), dim = q.size(1), workers = num_workers(queue.size(0));
  const bool accumulate = weighted.defined();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> part_max(workers * n, neg_inf), part_sum(workers * n, T(0));
  // One (N x D) accumulator per worker, relative to that worker's running row maxima.
  at::Tensor part_acc = accumulate ? at::zeros({workers, n, dim}, q.options()) : at::Tensor();
  for_each_queue_block(q, queue.size(0), workers, [&](int64_t first, int64_t rows, int64_t worker,
                                                      at::Tensor& scratch) {
    at::Tensor s = similarity_block<T>(q, queue, first, rows, inv_temperature, win, scratch);
    T* sp = s.data_ptr<T>();
    T* acc = accumulate ? part_acc[worker].data_ptr<T>() : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      T* sr = sp + r * rows;
      T mx = neg_inf, sum = 0;
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < rows; ++c) mx = std::max(mx, sr[c]);
      T& m = part_max[worker * n + r];
      T& l = part_sum[worker * n + r];
      const T new_max = std::max(m, mx);
      if (new_max == neg_inf) {  // nothing in the window yet for this row
        if (accumulate) std::fill(sr, sr + rows, T(0));
        continue;
      }
      // exp(s - new_max) in place: the P block of the accumulating GEMM (-inf -> 0).
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < rows; ++c) sum += (sr[c] = fast_exp(sr[c] - new_max));
      const T rescale = std::exp(m - new_max);
      l = l * rescale + sum;
      m = new_max;
      if (accumulate && rescale != T(1))
        for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] *= rescale;
    }
    if (accumulate) part_acc[worker].addmm_(s, queue.narrow(0, first, rows));
  });
  const std::vector<T> pos = positives<T>(q, k, inv_temperature);
  T* loss_p = loss.data_ptr<T>();
  T* lse_p = lse.data_ptr<T>();
  std::vector<T> worker_scale(workers);
  for (int64_t r = 0; r < n; ++r) {
    T m = pos[r];
    for (int64_t w = 0; w < workers; ++w) m = std::max(m, part_max[w * n + r]);
    T l = std::exp(pos[r] - m);
    for (int64_t w = 0; w < workers; ++w) {
      worker_scale[w] = std::exp(part_max[w * n + r] - m);  // 0 for a worker that saw nothing
      l += part_sum[w * n + r] * worker_scale[w];
    }
    const T log_sum = std::log(l);
    lse_p[r] = m + log_sum;
    loss_p[r] = (m - pos[r]) + log_sum;  // lse - pos would cancel a small loss's digits
    if (accumulate) {
      T* out = weighted.data_ptr<T>() + r * dim;
      std::fill(out, out + dim, T(0));
      for (int64_t w = 0; w < workers; ++w) {
        const T* acc = part_acc.data_ptr<T>() + (w * n + r) * dim;
        const T scale = worker_scale[w] / l;
        for (int64_t d = 0; d < dim; ++d) out[d] += scale * acc[d];
      }
    }
  }
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue) {
  TORCH_CHECK(q.dim() == 2 && k.sizes() == q.sizes() && queue.dim() == 2 && queue.size(1) == q.size(1) &&
                  q.size(0) >= 1 && q.size(1) >= 1 && queue.size(0) >= 1,
              "infonce: q, k must be (N, D) and queue (K, D)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& queue_in, const at::Tensor& start,
                                                           const at::Tensor& count, double inv_temperature,
                                                           bool with_weighted) {
  check_inputs(q_in, k_in, queue_in);
  const auto type = compute_type(q_in);
  // detach: grad mode does not reach the worker threads, and the Python op owns autograd.
  const at::Tensor q = q_in.detach().to(type).contiguous(), k = k_in.detach().to(type).contiguous();
  const at::Tensor queue = queue_in.detach().to(type).contiguous();
  at::Tensor loss = at::empty({q.size(0)}, q.options()), lse = at::empty({q.size(0)}, q.options());
  at::Tensor weighted = with_weighted ? at::empty_like(q) : at::Tensor();
  const QueueWindow win = window(queue, start, count);
  AT_DISPATCH_FLOATING_TYPES(type, "infonce_fwd_cpu", [&] {
    forward_impl<scalar_t>(q, k, queue, win, inv_temperature, loss, lse, weighted);
  });
  return {loss, lse, with_weighted ? weighted : at::empty({0, q.size(1)}, q.options())};
}

}  // namespace
}  // namespace contrastive_kernels::cpu

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("infonce_fwd", &contrastive_kernels::cpu::infonce_fwd);
}
