"""Eager PyTorch versions of every op: the test oracle and the benchmark baseline.

These build the full similarity matrices on purpose (that is what users write by hand and
what the fused kernels are measured against). Each function has the same name and the same
arguments as the fused op it checks; DESIGN.md section 2 is the math.
"""
import torch
import torch.nn.functional as F


def ntxent(z_a, z_b, temperature=0.5, *, normalize=True, reduction="mean"):
    """NT-Xent (SimCLR) loss, building the 2N x 2N logits matrix.

    Row i of z = cat(z_a, z_b) has its positive at (i + N) mod 2N; every other row except
    itself is a negative. Same value as lightly's NTXentLoss(temperature).
    """
    n = z_a.shape[0]
    z = torch.cat([z_a, z_b])
    if normalize:
        z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, positives, reduction=reduction)
