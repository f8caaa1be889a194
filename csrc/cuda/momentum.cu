// Momentum (EMA) update in CUDA C++: target[i] = m * target[i] + (1 - m) * online[i], in place,
// the same contract as csrc/cpu/momentum.cpp.
//
// Multi-tensor apply as in apex: every tensor pair is cut into chunks of kChunk values, and a
// chunk table (target address, online address, length) built on the host goes to the device in
// one pinned, stream-ordered copy; block b of a single launch updates chunk b. So a model's
// hundreds of tensors cost one launch per (target dtype, online dtype) pair, not one per tensor,
// and the table has no limit on the number of tensors (apex's kernel-argument table holds ~110).
// A chunk whose two addresses are 16-byte aligned (every chunk of a tensor that starts aligned,
// as the caching allocator's do) moves whole 16-byte vectors; a misaligned one, and the tail,
// go value by value.
//
// Dtypes float16, bfloat16, float32, float64 in any pairing, computed in float32 (float64 if
// either side is) and rounded once to the target's dtype. A non-contiguous target is updated in
// a dense copy written back; a non-contiguous online tensor is read through a dense copy.
// Status: compiled for sm_80/sm_90 in CI; its tests (marked gpu) run only on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>
#include <vector>

namespace contrastive_kernels::cuda {
namespace {

constexpr int kThreads = 256;
// 16K values per block: 16 float4 per thread, and ~1,600 blocks for a ResNet-50 (25.5M values),
// several waves over an H100's 132 SMs.
constexpr int64_t kChunk = 1 << 14;

// A table row, as three int64 so that the whole table is one int64 tensor.
struct Chunk {
  int64_t target, online, numel;  // addresses of the chunk's first values, its length
};

template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

template <typename T, typename O, typename acc_t>
__global__ void __launch_bounds__(kThreads) momentum_kernel(const Chunk* __restrict__ chunks, acc_t momentum,
                                                            acc_t weight) {
  // 16 bytes of the wider of the two dtypes per vector: float4 of a float32 target, 8 bytes of
  // a bfloat16 online tensor beside it.
  constexpr int kVec = 16 / (sizeof(T) > sizeof(O) ? sizeof(T) : sizeof(O));
  const Chunk chunk = chunks[blockIdx.x];
  T* target = reinterpret_cast<T*>(chunk.target);
  const O* online = reinterpret_cast<const O*>(chunk.online);
  const auto update = [&](T t, O o) {
    return static_cast<T>(momentum * static_cast<acc_t>(t) + weight * static_cast<acc_t>(o));
  };

  int64_t done = 0;
  if (chunk.target % sizeof(Pack<T, kVec>) == 0 && chunk.online % sizeof(Pack<O, kVec>) == 0) {
    const int64_t vectors = chunk.numel / kVec;
    auto* target_vec = reinterpret_cast<Pack<T, kVec>*>(target);
    const auto* online_vec = reinterpret_cast<const Pack<O, kVec>*>(online);
    for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
      Pack<T, kVec> t = target_vec[v];
      const Pack<O, kVec> o = online_vec[v];
#pragma unroll
      for (int k = 0; k < kVec; ++k) t.v[k] = update(t.v[k], o.v[k]);
      target_vec[v] = t;
    }
    done = vectors * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < chunk.numel; i += kThreads) target[i] = update(target[i], online[i]);
}

// One launch over `pairs` (all of one target dtype T and one online dtype O).
template <typename T, typename O>
void launch(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, double momentum) {
  using acc_t = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<O, double>, double, float>;
  std::vector<Chunk> rows;
  for (const auto& [target, online] : pairs) {
    const auto t0 = reinterpret_cast<int64_t>(target.data_ptr()), o0 = reinterpret_cast<int64_t>(online.data_ptr());
    for (int64_t start = 0; start < target.numel(); start += kChunk)
      rows.push_back({t0 + start * static_cast<int64_t>(sizeof(T)), o0 + start * static_cast<int64_t>(sizeof(O)),
                      std::min(kChunk, target.numel() - start)});
  }
  if (rows.empty()) return;
  TORCH_CHECK(rows.size() < static_cast<size_t>(INT_MAX), "momentum_update (cuda): too many chunks");
  // Pinned host memory: the copy is asynchronous and the caching host allocator keeps the buffer
  // until the copy has run on this stream.
  at::Tensor host = at::empty({static_cast<int64_t>(rows.size()) * 3},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(rows.begin(), rows.end(), reinterpret_cast<Chunk*>(host.data_ptr<int64_t>()));
  const at::Tensor table = host.to(pairs.front().first.device(), at::kLong, /*non_blocking=*/true);
  momentum_kernel<T, O, acc_t><<<static_cast<unsigned int>(rows.size()), kThreads, 0,
                                 c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Chunk*>(table.data_ptr<int64_t>()), static_cast<acc_t>(momentum),
      static_cast<acc_t>(1.0 - momentum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_online(at::ScalarType online, const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs,
                       double momentum) {
  switch (online) {
    case at::kDouble: return launch<T, double>(pairs, momentum);
    case at::kFloat: return launch<T, float>(pairs, momentum);
    case at::kHalf: return launch<T, at::Half>(pairs, momentum);
    case at::kBFloat16: return launch<T, at::BFloat16>(pairs, momentum);
    default: TORCH_CHECK(false, "momentum_update (cuda): unsupported online dtype ", online);
  }
}

void launch_for(at::ScalarType target, at::ScalarType online,
                const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, double momentum) {
  switch (target) {
    case at::kDouble: return launch_for_online<double>(online, pairs, momentum);
    case at::kFloat: return launch_for_online<float>(online, pairs, momentum);
    case at::kHalf: return launch_for_online<at::Half>(online, pairs, momentum);
    case at::kBFloat16: return launch_for_online<at::BFloat16>(online, pairs, momentum);
    default: TORCH_CHECK(false, "momentum_update (cuda): unsupported target dtype ", target);
  }
}

void momentum_update_(at::TensorList target_list, at::TensorList online_list, double momentum) {
  TORCH_CHECK(target_list.size() == online_list.size(), "momentum_update (cuda): target and online differ in length");
  if (target_list.empty()) return;
  const c10::cuda::CUDAGuard guard(target_list[0].device());
  const at::NoGradGuard no_grad;  // the Python op owns autograd; keeps the dense copies out of any graph
  // (target dtype, online dtype) -> its pairs, in first-seen order: one launch per group.
  using Pairs = std::vector<std::pair<at::Tensor, at::Tensor>>;
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, Pairs>> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (non-contiguous target, its dense copy)
  for (size_t i = 0; i < target_list.size(); ++i) {
    const at::Tensor& target = target_list[i];
    const at::Tensor& online = online_list[i];
    TORCH_CHECK(target.device() == target_list[0].device() && online.device() == target.device(),
                "momentum_update (cuda): every tensor must be on ", target_list[0].device());
    TORCH_CHECK(target.sizes() == online.sizes(), "momentum_update (cuda): target[", i, "] and online[", i,
                "] differ in shape");
    if (target.numel() == 0) continue;
    at::Tensor dense_target = target.contiguous();
    if (!target.is_contiguous()) write_back.emplace_back(target, dense_target);
    const std::pair<at::ScalarType, at::ScalarType> key{target.scalar_type(), online.scalar_type()};
    auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (group == groups.end()) group = groups.insert(groups.end(), {key, {}});
    group->second.emplace_back(std::move(dense_target), online.contiguous());
  }
  for (const auto& [key, pairs] : groups) launch_for(key.first, key.second, pairs, momentum);
  for (auto& [target, dense] : write_back) target.copy_(dense);
}

}  // namespace
}  // namespace contrastive_kernels::cuda

TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
  m.impl("momentum_update_", &contrastive_kernels::cuda::momentum_update_);
}
