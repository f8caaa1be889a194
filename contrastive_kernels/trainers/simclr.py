"""SimCLR: two augmented views per image, one encoder, NT-Xent over the 2N projections."""
import torch

from .. import reference
from ..ops import ntxent
from ..ops.ntxent import fused_ntxent
from .engine import Trainer


class SimCLRTrainer(Trainer):
    """SimCLR (Chen et al., 2020) on `fused_ntxent`. With backend="torch" the loss is
    reference.ntxent (eager, 2N x 2N logits): the reference trainer. Under torch.distributed the
    negatives are the rows of every rank (fused_ntxent(group=); the reference trainer gathers
    with gradient, reference.ntxent_all_gather)."""
    method = "simclr"
    ops = {"fused_ntxent": ntxent.SUPPORTED_BACKENDS}
    defaults = {"epochs": 30, "batch_size": 128, "lr": 0.3, "temperature": 0.5}

    def training_loss(self, view_a, view_b):
        # One forward over both views: BatchNorm sees all 2N images, as in SimCLR.
        z_a, z_b = self.forward(torch.cat([view_a, view_b])).float().chunk(2)
        if self.config.backend == "torch":
            if self.group is not None:
                return reference.ntxent_all_gather(z_a, z_b, self.config.temperature, group=self.group)
            return reference.ntxent(z_a, z_b, self.config.temperature)
        return fused_ntxent(z_a, z_b, self.config.temperature, backend=self.config.backend, group=self.group)
