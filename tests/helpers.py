"""Comparison helpers (a failing check prints the worst mismatching elements), and runners of
fresh processes that import contrastive_kernels from this checkout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from contrastive_kernels._backends import TRITON_INTERPRET


def cpu_backends():
    """Backends that run CPU tensors in this process (Triton only under its interpreter)."""
    return ["torch", "cpu"] + (["triton"] if TRITON_INTERPRET else [])


def worst(actual, expected, k=5):
    diff = (actual.double() - expected.double()).abs().flatten()
    top = diff.topk(min(k, diff.numel()))
    rows = [f"  [{i}] actual={actual.flatten()[i].item():.10g} expected={expected.flatten()[i].item():.10g}"
            f" |diff|={d:.3g}" for d, i in zip(top.values.tolist(), top.indices.tolist())]
    return "\n".join(rows)


def assert_close(actual, expected, *, rtol, atol=0.0, name="value"):
    """|actual - expected| <= atol + rtol * |expected| elementwise, else the worst elements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((diff <= bound).all()):
        raise AssertionError(f"{name}: {int((diff > bound).sum())} of {diff.numel()} elements off "
                             f"(rtol={rtol}, atol={atol}); worst:\n{worst(actual, expected)}")


def max_error(actual, oracle):
    return (actual.double() - oracle.double()).abs().max().item()


def assert_within_reference_error(actual, same_dtype_ref, oracle, *, factor, ulps=1, name="value"):
    """The flash-attention rule: our error against a float64 oracle is at most `factor` times the
    error of the eager reference computed in the same low precision, plus `ulps` units of
    rounding at the oracle's scale (sums taken in another order than BLAS's differ by a few)."""
    ours, theirs = max_error(actual, oracle), max_error(same_dtype_ref, oracle)
    ulp = ulps * torch.finfo(actual.dtype).eps * oracle.double().abs().max().item()
    assert ours <= factor * theirs + ulp, (
        f"{name}: error {ours:.3g} > {factor} x reference error {theirs:.3g} + {ulp:.3g}; worst:\n"
        f"{worst(actual, oracle)}")


CHECKOUT = Path(__file__).resolve().parent.parent


def run_from_checkout(command, *, cwd, timeout=900, triton_interpret=True):
    """Runs `command` (an argv list) in a fresh process whose contrastive_kernels is this checkout's.
    With triton_interpret=False, TRITON_INTERPRET is dropped, so the CPU ops run the C++ and torch
    backends."""
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    if not triton_interpret:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_cli(*args, cwd):
    """`python -m contrastive_kernels train ...` in a fresh process, from this checkout."""
    return run_from_checkout([sys.executable, "-m", "contrastive_kernels", "train", *args], cwd=cwd)


def read_metrics(out):
    """The records of a training run's `out/metrics.jsonl`, one dict per epoch."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
