// Ring-buffer enqueue on the GPU without a host sync: the head is read on the device. One
// thread per element copies keys[r] to buffer[(head + r) mod K]; a one-thread kernel then
// moves head and count (same stream, so after every copy has read the old head).
// Status: compiled for sm_80/sm_90 in CI; its tests (marked gpu) run only on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace contrastive_kernels::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void enqueue_rows_kernel(scalar_t* __restrict__ buffer, const scalar_t* __restrict__ keys,
                                    const int64_t* __restrict__ head, int64_t size, int64_t batch,
                                    int64_t dim) {
  const int64_t start = *head;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < batch * dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dim, d = i % dim;
    buffer[((start + r) % size) * dim + d] = keys[i];
  }
}

__global__ void advance_kernel(int64_t* head, int64_t* count, int64_t size, int64_t batch) {
  *head = (*head + batch) % size;
  *count = min(*count + batch, size);
}

void queue_enqueue_(const at::Tensor& buffer, const at::Tensor& head, const at::Tensor& count,
                    const at::Tensor& keys_in) {
  TORCH_CHECK(buffer.is_cuda() && head.is_cuda() && count.is_cuda(), "queue_enqueue_ (cuda): CUDA tensors");
  TORCH_CHECK(buffer.dim() == 2 && buffer.is_contiguous(), "queue_enqueue_: buffer must be a contiguous (K, D) tensor");
  TORCH_CHECK(keys_in.dim() == 2 && keys_in.size(1) == buffer.size(1) && keys_in.size(0) <= buffer.size(0),
              "queue_enqueue_: keys must be (B, D) with B <= K");
  TORCH_CHECK(head.scalar_type() == at::kLong && count.scalar_type() == at::kLong, "queue_enqueue_: int64 head/count");
  const c10::cuda::CUDAGuard guard(buffer.device());
  const at::Tensor keys = keys_in.detach().to(buffer.scalar_type()).contiguous();
  const int64_t size = buffer.size(0), batch = keys.size(0), dim = buffer.size(1);
  if (batch == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((batch * dim + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "queue_enqueue_cuda", [&] {
    enqueue_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        buffer.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), head.data_ptr<int64_t>(), size, batch, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  advance_kernel<<<1, 1, 0, stream>>>(head.data_ptr<int64_t>(), count.data_ptr<int64_t>(), size, batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace contrastive_kernels::cuda

TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
  m.impl("queue_enqueue_", &contrastive_kernels::cuda::queue_enqueue_);
}
