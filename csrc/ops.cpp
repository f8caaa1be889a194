// The schema of every native op of contrastive_kernels, in one place.
// Implementations register per device: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
// The Python layer (contrastive_kernels/ops/*.py) wraps these in torch.library custom ops
// with autograd; nothing here is meant to be called by users directly.
#include <torch/library.h>

TORCH_LIBRARY(contrastive_kernels, m) {
  // NT-Xent of the rows of z = cat(z_a, z_b) (2N x D, already normalised if asked) against the
  // negatives cols (C x D), in which row r of z is column offset + r (single process: cols = z,
  // offset 0). Returns the per-row losses and log-sum-exps (float32, or float64 for float64 z).
  m.def("ntxent_fwd(Tensor z, Tensor cols, int offset, float inv_temperature) -> (Tensor, Tensor)");
  // d/dz of sum_j grad_cols[j] * l_j over every column j, given one lse and one upstream
  // gradient per column (the rows' own are at offset + r); same dtype as the forward's outputs.
  m.def("ntxent_bwd(Tensor z, Tensor cols, Tensor lse_cols, Tensor grad_cols, int offset, "
        "float inv_temperature) -> Tensor");
  // target[i] = momentum * target[i] + (1 - momentum) * online[i], in place, for every pair.
  m.def("momentum_update_(Tensor(a!)[] target, Tensor[] online, float momentum) -> ()");
  // Ring buffer: writes keys (B x D) at row `head` of buffer (K x D), wrapping around, then
  // head = (head + B) % K and count = min(count + B, K). head and count are int64 scalars.
  m.def("queue_enqueue_(Tensor(a!) buffer, Tensor(b!) head, Tensor(c!) count, Tensor keys) -> ()");
  // MoCo InfoNCE of queries q against positives k and the queue rows m with
  // (m - start) mod K < count (start, count: int64 scalars). Per-row losses and log-sum-exps and,
  // if with_weighted, sum_m P_im queue_m (N x D; else 0 x D), from which autograd builds dq, dk.
  m.def("infonce_fwd(Tensor q, Tensor k, Tensor queue, Tensor start, Tensor count, "
        "float inv_temperature, bool with_weighted) -> (Tensor, Tensor, Tensor)");
}
