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


def ntxent_all_gather(z_a, z_b, temperature=0.5, *, group, normalize=True, reduction="mean"):
    """Multi-process NT-Xent the usual way (OpenCLIP's and lightly's gather with gradient):
    every rank gathers all ranks' rows through torch.distributed.nn.all_gather, whose backward
    sends each gathered row's gradient back to its rank and sums it there, builds its
    2N x 2NW logits and takes the cross-entropy of its own 2N rows. Same value and gradients
    as fused_ntxent(..., group=group)."""
    import torch.distributed as dist
    from torch.distributed.nn import all_gather

    n, rank = z_a.shape[0], dist.get_rank(group)
    z = torch.cat([z_a, z_b])
    if normalize:
        z = F.normalize(z, dim=1)
    cols = torch.cat(all_gather(z, group=group))  # every rank's rows, in rank order
    logits = z @ cols.T / temperature
    local = torch.arange(2 * n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[local, rank * 2 * n + local] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = rank * 2 * n + (local + n) % (2 * n)
    return F.cross_entropy(logits, positives, reduction=reduction)


def infonce(q, k, queue, temperature=0.07, *, normalize=True, reduction="mean"):
    """MoCo's InfoNCE loss as facebookresearch/moco computes it: logits = cat([l_pos, l_neg]) / T
    with the positive key in column 0, then cross-entropy against label 0. `queue` is (K, D),
    one negative per row (MoCo stores its transpose), and gets no gradient."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach().T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


@torch.no_grad()
def momentum_update(target, online, momentum):
    """MoCo's per-parameter loop: p_k.data = p_k.data * m + p_q.data * (1 - m)."""
    targets = target.parameters() if isinstance(target, torch.nn.Module) else target
    onlines = online.parameters() if isinstance(online, torch.nn.Module) else online
    for p_k, p_q in zip(targets, onlines):
        p_k.data = p_k.data * momentum + p_q.data * (1.0 - momentum)


class MoCoQueue:
    """MoCo's ring buffer: a (dim, K) queue and a pointer read back to the host every step.

    `dequeue_and_enqueue` is MoCo's `_dequeue_and_enqueue` (K % batch == 0 required). `rows()`
    returns the queue as (K, dim), the layout of contrastive_kernels.KeyQueue.buffer.
    """

    def __init__(self, size, dim, dtype=torch.float32, device=None):
        self.K = size
        self.queue = torch.zeros(dim, size, dtype=dtype, device=device)
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # the host sync that KeyQueue avoids
        assert self.K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def rows(self):
        return self.queue.T
