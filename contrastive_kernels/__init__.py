"""Fused kernels for contrastive self-supervised learning (SimCLR, MoCo)."""
from .ops.ntxent import fused_ntxent

__all__ = ["fused_ntxent"]
__version__ = "0.1.0"
