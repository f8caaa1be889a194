// The schema of every native op of contrastive_kernels, in one place.
// Implementations register per device: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
// The Python layer (contrastive_kernels/ops/*.py) wraps these in torch.library custom ops
// with autograd; nothing here is meant to be called by users directly.
#include <torch/library.h>

TORCH_LIBRARY(contrastive_kernels, m) {
  // NT-Xent over z = cat(z_a, z_b) (2N x D, already normalised if asked).
  // Returns the per-row losses and the per-row log-sum-exps (float32, or float64 for float64 z).
  m.def("ntxent_fwd(Tensor z, float inv_temperature) -> (Tensor, Tensor)");
  // Gradient w.r.t. z given the per-row upstream gradients; same dtype as the forward's outputs.
  m.def("ntxent_bwd(Tensor z, Tensor lse, Tensor grad_rows, float inv_temperature) -> Tensor");
}
