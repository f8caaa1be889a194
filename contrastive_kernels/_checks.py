"""Argument checks shared by the loss ops: clear errors that name the argument."""
import math

import torch

from ._backends import check_backend_name

REDUCTIONS = ("mean", "sum", "none")


def check_matrix(name, t, what="a torch.Tensor"):
    """t is a non-empty 2-D floating tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {what}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); need at least one row and D >= 1")


def check_same(first_name, first, name, t):
    """t has first's device and dtype."""
    if t.device != first.device:
        raise ValueError(f"{first_name} and {name} must be on the same device, got {first.device} and {t.device}")
    if t.dtype != first.dtype:
        raise TypeError(f"{first_name} and {name} must have the same dtype, got {first.dtype} and {t.dtype}")


def check_loss_options(temperature, normalize, reduction, backend):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_backend_name(backend)
