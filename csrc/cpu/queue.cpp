// Ring-buffer enqueue on the CPU: rows of keys go to buffer rows (head + r) mod K, oldest
// overwritten; then head and count move. head and count are int64 scalar tensors, so the
// same state works for the CUDA and Triton kernels, which must not read them on the host.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace contrastive_kernels::cpu {
namespace {

void queue_enqueue_(const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& count,
                    const at::Tensor& keys_in) {
  TORCH_CHECK(buffer.dim() == 2 && buffer.is_contiguous(), "queue_enqueue_: buffer must be a contiguous (K, D) tensor");
  TORCH_CHECK(keys_in.dim() == 2 && keys_in.size(1) == buffer.size(1) && keys_in.size(0) <= buffer.size(0),
              "queue_enqueue_: keys must be (B, D) with B <= K");
  TORCH_CHECK(head.scalar_type() == at::kLong && count.scalar_type() == at::kLong && head.numel() == 1 &&
              count.numel() == 1, "queue_enqueue_: head and count must be int64 scalars");
  const at::Tensor keys = keys_in.detach().to(buffer.scalar_type()).contiguous();
  const int64_t size = buffer.size(0), batch = keys.size(0);
  const int64_t row_bytes = buffer.size(1) * buffer.element_size();
  int64_t* head_p = head.data_ptr<int64_t>();
  int64_t* count_p = count.data_ptr<int64_t>();
  const int64_t start = *head_p;
  auto* dst = static_cast<char*>(buffer.data_ptr());
  const auto* src = static_cast<const char*>(keys.data_ptr());
  // At most two contiguous runs: up to the end of the buffer, then from its start.
  const int64_t first = std::min(batch, size - start);
  at::parallel_for(0, batch, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = r < first ? start + r : r - first;
      std::memcpy(dst + row * row_bytes, src + r * row_bytes, row_bytes);
    }
  });
  *head_p = (start + batch) % size;
  *count_p = std::min(*count_p + batch, size);
}

}  // namespace
}  // namespace contrastive_kernels::cpu

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("queue_enqueue_", &contrastive_kernels::cpu::queue_enqueue_);
}
