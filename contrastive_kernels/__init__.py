"""Fused kernels for contrastive self-supervised learning (SimCLR, MoCo)."""
from .ops.infonce import fused_infonce
from .ops.momentum import flatten_parameters, momentum_update
from .ops.ntxent import fused_ntxent
from .ops.queue import KeyQueue

__all__ = ["fused_ntxent", "fused_infonce", "momentum_update", "flatten_parameters", "KeyQueue"]
__version__ = "0.1.0"
