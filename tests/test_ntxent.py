"""fused_ntxent against the eager reference, on every backend that runs here."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contrastive_kernels import fused_ntxent, reference
from contrastive_kernels.nn import NTXentLoss
from contrastive_kernels.ops.ntxent import ntxent_backward, ntxent_rows
from helpers import assert_close, assert_within_reference_error, cpu_backends

BACKENDS = cpu_backends()


def views(n, d, dtype=torch.float64, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z_a = torch.randn(n, d, dtype=torch.float64, generator=gen).to(device, dtype).requires_grad_()
    z_b = torch.randn(n, d, dtype=torch.float64, generator=gen).to(device, dtype).requires_grad_()
    return z_a, z_b


def loss_and_grads(fn, z_a, z_b, upstream=None):
    loss = fn(z_a, z_b)
    grad_a, grad_b = torch.autograd.grad(loss, (z_a, z_b), upstream)
    return loss, grad_a, grad_b


def check_against_reference(backend, z_a, z_b, temperature, normalize, reduction, rtol, atol):
    kwargs = dict(normalize=normalize, reduction=reduction)
    upstream = torch.randn(2 * z_a.shape[0], dtype=z_a.dtype) if reduction == "none" else None
    expected = loss_and_grads(lambda a, b: reference.ntxent(a, b, temperature, **kwargs), z_a, z_b, upstream)
    actual = loss_and_grads(lambda a, b: fused_ntxent(a, b, temperature, backend=backend, **kwargs),
                            z_a, z_b, upstream)
    for name, a, e in zip(("loss", "grad z_a", "grad z_b"), actual, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{backend} {name}")


# N = 1..3 on purpose, D not a power of two, and 2N across the CPU kernel's 256-row tiles.
SHAPES = [(1, 1), (2, 3), (3, 7), (17, 33), (64, 128), (129, 50), (300, 19)]


def small_enough(backend, n, d):
    # The Triton interpreter is slow: it gets the shapes up to 129 x 50 (several tiles).
    return backend != "triton" or n * d <= 129 * 50


@pytest.mark.parametrize("backend,n,d", [(b, n, d) for b in BACKENDS for n, d in SHAPES
                                         if small_enough(b, n, d)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(backend, n, d, reduction):
    z_a, z_b = views(n, d)
    check_against_reference(backend, z_a, z_b, 0.3, True, reduction, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend,n,d", [(b, n, d) for b in BACKENDS
                                         for n, d in [(5, 16), (100, 64), (300, 128)]
                                         if small_enough(b, n, d)])
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_matches_float32_reference(backend, n, d, normalize):
    z_a, z_b = views(n, d, torch.float32)
    if not normalize:  # raw logits of unnormalised rows: scale so that softmax is not one-hot
        z_a, z_b = (z.detach().mul(0.2).requires_grad_() for z in (z_a, z_b))
    check_against_reference(backend, z_a, z_b, 0.5, normalize, "mean", rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, normalize):
    z_a, z_b = views(3, 5)
    fn = lambda a, b: fused_ntxent(a, b, 0.7, normalize=normalize, reduction="none", backend=backend)
    assert torch.autograd.gradcheck(fn, (z_a, z_b))


def check_within_reference_error(backend, z_a, z_b, *, factor, upstream=True):
    """Low precision: our error against a float64 oracle within `factor` x the eager loss's own
    error in the same dtype; with per-row upstream gradients unless upstream=False."""
    reduction = "none" if upstream else "mean"
    grad = torch.randn(2 * z_a.shape[0], device=z_a.device, dtype=z_a.dtype) if upstream else None
    loss = lambda fn: (lambda a, b: fn(a, b, 0.2, reduction=reduction))
    ours = loss_and_grads(loss(functools.partial(fused_ntxent, backend=backend)), z_a, z_b, grad)
    eager = loss_and_grads(loss(reference.ntxent), z_a, z_b, grad)
    a64, b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    oracle = loss_and_grads(loss(reference.ntxent), a64, b64, None if grad is None else grad.double())
    for name, o, e, x in zip(("loss", "grad z_a", "grad z_b"), ours, eager, oracle):
        assert o.dtype == z_a.dtype
        assert_within_reference_error(o, e, x, factor=factor, name=f"{backend} {name}")


@pytest.mark.parametrize("n,d", [(3, 5), (40, 72)])
def test_triton_float16_within_reference_error(n, d):
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    check_within_reference_error("triton", *views(n, d, torch.float16), factor=3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu_within_reference_error(backend, dtype):
    # These backends compute in float32: far better than the eager reference in the same dtype.
    check_within_reference_error(backend, *views(50, 40, dtype), factor=1, upstream=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 70), d=st.integers(1, 200), temperature=st.floats(0.05, 2.0),
       reduction=st.sampled_from(["mean", "sum", "none"]), normalize=st.booleans(),
       backend=st.sampled_from(["torch", "cpu"]), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_temperatures_reductions(n, d, temperature, reduction, normalize, backend, seed):
    z_a, z_b = views(n, d, seed=seed)
    check_against_reference(backend, z_a, z_b, temperature, normalize, reduction, rtol=1e-8, atol=1e-10)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), d=st.integers(1, 80), temperature=st.floats(0.05, 2.0),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_triton_interpreter(n, d, temperature, reduction, seed):
    # Odd shapes make ill-conditioned cases, so the oracle is float64 and the bar is the float32
    # reference's own error against it (DESIGN section 5). The rows come normalised (in float64)
    # with normalize=False: through F.normalize's backward, D=1 has an exact-zero gradient that
    # float32 turns into noise of no scale, which would test torch rather than the kernels.
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    z_a, z_b = (F.normalize(z.detach(), dim=1).float().requires_grad_() for z in views(n, d, seed=seed))
    upstream = torch.randn(2 * n) if reduction == "none" else None
    kwargs = dict(normalize=False, reduction=reduction)
    ours = loss_and_grads(lambda a, b: fused_ntxent(a, b, temperature, backend="triton", **kwargs), z_a, z_b,
                          upstream)
    eager32 = loss_and_grads(lambda a, b: reference.ntxent(a, b, temperature, **kwargs), z_a, z_b, upstream)
    a64, b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    oracle = loss_and_grads(lambda a, b: reference.ntxent(a, b, temperature, **kwargs), a64, b64,
                            None if upstream is None else upstream.double())
    for name, o, e, x in zip(("loss", "grad z_a", "grad z_b"), ours, eager32, oracle):
        assert_within_reference_error(o, e, x, factor=2, ulps=4, name=f"triton {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_strided_inputs(backend):
    base = torch.randn(3, 40, 2 * 23, dtype=torch.float64)
    z_a = base[0, :, ::2].requires_grad_()       # every other column
    z_b = base[1].T.contiguous().T[:, 1::2].detach().requires_grad_()  # transposed storage
    assert not z_a.is_contiguous() and not z_b.is_contiguous()
    check_against_reference(backend, z_a, z_b, 0.4, True, "none", rtol=1e-8, atol=1e-12)


def lightly_ntxent(out0, out1, temperature):
    """lightly's NTXentLoss(temperature) without memory bank, single process, as it computes:
    per-view-pair logits, the self-similarities removed, cross-entropy against the other view."""
    n = out0.shape[0]
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    keep = ~torch.eye(n, dtype=torch.bool)
    l00 = (out0 @ out0.T / temperature)[keep].view(n, -1)
    l01 = out0 @ out1.T / temperature
    l10 = out1 @ out0.T / temperature
    l11 = (out1 @ out1.T / temperature)[keep].view(n, -1)
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)], 0)
    return F.cross_entropy(logits, torch.arange(n).repeat(2))


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_equals_lightly_ntxent(temperature):
    z_a, z_b = views(33, 24)
    assert_close(fused_ntxent(z_a, z_b, temperature), lightly_ntxent(z_a, z_b, temperature),
                 rtol=1e-10, name="loss")


def test_module_wrapper():
    z_a, z_b = views(9, 11)
    module = NTXentLoss(0.25, reduction="sum", backend="torch")
    assert "temperature=0.25" in repr(module)
    assert_close(module(z_a, z_b), reference.ntxent(z_a, z_b, 0.25, reduction="sum"), rtol=1e-10)


def test_loss_is_finite_for_tiny_temperatures():
    # s/T spans hundreds here: the online log-sum-exp must not overflow or underflow.
    z_a, z_b = views(20, 8)
    for backend in BACKENDS:
        check_against_reference(backend, z_a, z_b, 0.01, True, "none", rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Bad input: a clear error that names the argument, before anything runs.
# ---------------------------------------------------------------------------------------
def good():
    return torch.randn(4, 8), torch.randn(4, 8)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(4, 8), torch.randn(5, 8)), {}, ValueError, "same shape"),
    ((torch.randn(4, 8), torch.randn(4, 9)), {}, ValueError, "same shape"),
    ((torch.randn(4, 8, 1), torch.randn(4, 8, 1)), {}, ValueError, "z_a must be 2-D"),
    ((torch.randn(4, 8), torch.randn(8)), {}, ValueError, "z_b must be 2-D"),
    ((torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)), {}, TypeError, "same dtype"),
    ((torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8))), {}, TypeError, "z_a must have a floating dtype"),
    ((torch.randn(0, 8), torch.randn(0, 8)), {}, ValueError, "z_a is empty"),
    ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "z_a is empty"),
    ((torch.randn(4, 8), [[1.0] * 8] * 4), {}, TypeError, "z_b must be a torch.Tensor"),
    (good(), {"temperature": 0.0}, ValueError, "temperature"),
    (good(), {"temperature": -1.0}, ValueError, "temperature"),
    (good(), {"temperature": float("nan")}, ValueError, "temperature"),
    (good(), {"temperature": float("inf")}, ValueError, "temperature"),
    (good(), {"temperature": torch.tensor(0.5)}, TypeError, "temperature"),
    (good(), {"reduction": "max"}, ValueError, "reduction"),
    (good(), {"normalize": "yes"}, TypeError, "normalize"),
    (good(), {"backend": "fastest"}, ValueError, "backend"),
    (good(), {"backend": "cuda"}, ValueError, "backend='cuda' is not"),
])
def test_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_ntxent(*args, **kwargs)


def test_different_devices_are_rejected():
    z_a = torch.randn(4, 8)
    z_b = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        fused_ntxent(z_a, z_b)


def test_triton_without_interpreter_or_gpu_is_unavailable(monkeypatch):
    from contrastive_kernels import _backends
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' is not available.*CUDA tensor"):
        fused_ntxent(*good(), backend="triton")


# ---------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile without graph breaks.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z = F.normalize(torch.randn(10, 12, dtype=torch.float64), dim=1).requires_grad_()
    torch.library.opcheck(ntxent_rows, (z, 0.5, backend))
    _, lse = ntxent_rows(z, 0.5, backend)
    # The backward op has no autograd formula of its own (no double backward), so no grad here.
    torch.library.opcheck(ntxent_backward, (z.detach(), lse.detach(), torch.rand(10, dtype=torch.float64),
                                            0.5, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    torch._dynamo.reset()
    model = torch.nn.Linear(12, 16, dtype=torch.float64)
    x_a, x_b = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 12, dtype=torch.float64)

    def step(x_a, x_b):
        return fused_ntxent(model(x_a), model(x_b), 0.3, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x_a, x_b)
    (grad,) = torch.autograd.grad(loss, model.weight)
    expected = reference.ntxent(model(x_a), model(x_b), 0.3)
    (expected_grad,) = torch.autograd.grad(expected, model.weight)
    assert_close(loss, expected, rtol=1e-10, name="compiled loss")
    assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12, name="compiled grad")


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    z_a, z_b = views(8, 16, torch.float32)
    compiled = torch.compile(lambda a, b: fused_ntxent(a, b, 0.5, backend="cpu"), fullgraph=True)
    check = lambda fn: loss_and_grads(fn, z_a, z_b)
    for a, e in zip(check(compiled), check(lambda a, b: reference.ntxent(a, b, 0.5))):
        assert_close(a, e, rtol=2e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# GPU: every backend and dtype on CUDA tensors (skipped without a GPU).
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch", "auto"])
@pytest.mark.parametrize("n,d", [(1, 3), (100, 128), (1000, 256), (4097, 64)])
def test_gpu_float32(backend, n, d):
    z_a, z_b = views(n, d, torch.float32, device="cuda")
    upstream = torch.randn(2 * n, device="cuda")
    expected = loss_and_grads(lambda a, b: reference.ntxent(a, b, 0.2, reduction="none"), z_a, z_b, upstream)
    actual = loss_and_grads(lambda a, b: fused_ntxent(a, b, 0.2, reduction="none", backend=backend),
                            z_a, z_b, upstream)
    for a, e in zip(actual, expected):
        assert_close(a, e, rtol=2e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(3, 5), (512, 128), (2049, 256)])
def test_gpu_low_precision_within_reference_error(backend, dtype, n, d):
    check_within_reference_error(backend, *views(n, d, dtype, device="cuda"), factor=3)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    # 2N * D = 2^31 + 2^21 elements: 32-bit offsets would wrap around. Row i is the unit vector
    # e_(i mod D) in both views, so every loss has a closed form: with m = 2N/D rows per class,
    # l_i = log((m - 1) e^(1/T) + (2N - m)) - 1/T. A wrapped offset reads the wrong class.
    n, d, temperature = (1 << 20) + (1 << 10), 1024, 0.5
    eye = torch.eye(d, device="cuda", dtype=torch.float16)
    z_a = eye.repeat(n // d, 1)
    with torch.no_grad():
        rows = fused_ntxent(z_a, z_a.clone(), temperature, reduction="none", backend="triton")
    m = 2 * n // d
    expected = math.log((m - 1) * math.exp(1 / temperature) + (2 * n - m)) - 1 / temperature
    assert_close(rows.float(), torch.full_like(rows, expected, dtype=torch.float32), rtol=1e-3)
