"""One module per op: Triton kernels, launchers, the registered torch.library op, autograd."""
