"""nn.Module wrappers around the fused ops, for code that expects loss modules."""
import torch

from .ops.infonce import fused_infonce
from .ops.ntxent import fused_ntxent


class NTXentLoss(torch.nn.Module):
    """SimCLR's NT-Xent loss: `NTXentLoss(temperature)(z_a, z_b)` == `fused_ntxent(z_a, z_b, temperature)`.
    With a torch.distributed `group`, the negatives are the rows of every rank (fused_ntxent's `group`)."""

    def __init__(self, temperature=0.5, *, normalize=True, reduction="mean", backend="auto", group=None):
        super().__init__()
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend, self.group = reduction, backend, group

    def forward(self, z_a, z_b):
        return fused_ntxent(z_a, z_b, self.temperature, normalize=self.normalize,
                            reduction=self.reduction, backend=self.backend, group=self.group)

    def extra_repr(self):
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class InfoNCELoss(torch.nn.Module):
    """MoCo's InfoNCE loss: `InfoNCELoss(temperature)(q, k, queue)` == `fused_infonce(q, k, queue, temperature)`."""

    def __init__(self, temperature=0.07, *, normalize=True, reduction="mean", backend="auto"):
        super().__init__()
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend = reduction, backend

    def forward(self, q, k, queue):
        return fused_infonce(q, k, queue, self.temperature, normalize=self.normalize,
                             reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
