"""fused_infonce against MoCo's eager loss, on every backend that runs here."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contrastive_kernels import KeyQueue, fused_infonce, reference
from contrastive_kernels.nn import InfoNCELoss
from contrastive_kernels.ops.infonce import infonce_rows
from helpers import assert_close, assert_within_reference_error, cpu_backends

BACKENDS = cpu_backends()


def inputs(n, d, queue_rows, dtype=torch.float64, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)
    q = make(n, d).to(device, dtype).requires_grad_()
    k = make(n, d).to(device, dtype).requires_grad_()
    queue = F.normalize(make(queue_rows, d), dim=1).to(device, dtype)
    return q, k, queue


def loss_and_grads(fn, q, k, upstream=None):
    loss = fn(q, k)
    return (loss, *torch.autograd.grad(loss, (q, k), upstream))


def check(backend, q, k, queue, temperature, normalize, reduction, rtol, atol, ref_queue=None):
    kwargs = dict(normalize=normalize, reduction=reduction)
    upstream = torch.randn(q.shape[0], dtype=q.dtype, device=q.device) if reduction == "none" else None
    ref_queue = queue if ref_queue is None else ref_queue
    expected = loss_and_grads(lambda a, b: reference.infonce(a, b, ref_queue, temperature, **kwargs), q, k, upstream)
    actual = loss_and_grads(lambda a, b: fused_infonce(a, b, queue, temperature, backend=backend, **kwargs),
                            q, k, upstream)
    for name, a, e in zip(("loss", "grad q", "grad k"), actual, expected):
        assert a.dtype == e.dtype
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{backend} {name}")


SHAPES = [(1, 1, 1), (2, 3, 5), (3, 7, 64), (17, 33, 129), (64, 128, 1000), (256, 50, 3000)]


def small_enough(backend, n, d, queue_rows):
    return backend != "triton" or n * queue_rows <= 17 * 1000


@pytest.mark.parametrize("backend,n,d,queue_rows", [(b, *s) for b in BACKENDS for s in SHAPES if small_enough(b, *s)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_moco(backend, n, d, queue_rows, reduction):
    q, k, queue = inputs(n, d, queue_rows)
    check(backend, q, k, queue, 0.07, True, reduction, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_matches_float32_moco(backend, normalize):
    q, k, queue = inputs(48, 64, 700, torch.float32)
    if not normalize:
        q, k = (t.detach().mul(0.3).requires_grad_() for t in (q, k))
    check(backend, q, k, queue, 0.2, normalize, "mean", rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, normalize):
    q, k, queue = inputs(3, 5, 9)
    fn = lambda a, b: fused_infonce(a, b, queue, 0.5, normalize=normalize, reduction="none", backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k))


def check_within_reference_error(backend, q, k, queue, temperature, *, factor, ulps=1):
    """Low precision: our error against a float64 oracle within `factor` x the eager loss's own."""
    upstream = torch.randn(q.shape[0], device=q.device, dtype=q.dtype)
    loss = lambda fn, queue_: (lambda a, b: fn(a, b, queue_, temperature, reduction="none"))
    ours = loss_and_grads(loss(functools.partial(fused_infonce, backend=backend), queue), q, k, upstream)
    eager = loss_and_grads(loss(reference.infonce, queue), q, k, upstream)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    oracle = loss_and_grads(loss(reference.infonce, queue.double()), q64, k64, upstream.double())
    for name, o, e, x in zip(("loss", "grad q", "grad k"), ours, eager, oracle):
        assert o.dtype == q.dtype
        assert_within_reference_error(o, e, x, factor=factor, ulps=ulps, name=f"{backend} {name}")


def test_triton_float16_within_reference_error():
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    check_within_reference_error("triton", *inputs(20, 48, 200, torch.float16), 0.1, factor=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 70), d=st.integers(1, 150), queue_rows=st.integers(1, 2500),
       temperature=st.floats(0.03, 2.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       normalize=st.booleans(), backend=st.sampled_from(["torch", "cpu"]), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes(n, d, queue_rows, temperature, reduction, normalize, backend, seed):
    q, k, queue = inputs(n, d, queue_rows, seed=seed)
    check(backend, q, k, queue, temperature, normalize, reduction, rtol=1e-8, atol=1e-10)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), d=st.integers(1, 70), queue_rows=st.integers(1, 300),
       temperature=st.floats(0.03, 2.0), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_triton_interpreter(n, d, queue_rows, temperature, seed):
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    q, k, queue = inputs(n, d, queue_rows, seed=seed)
    check("triton", q, k, queue, temperature, True, "none", rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_queue_uses_only_filled_rows_in_ring_order(backend):
    # 5 + 4 + 3 keys into 10 rows: wrapped, 2 dequeued, so the window is not a prefix.
    queue = KeyQueue(10, 6, dtype=torch.float64)
    added = [F.normalize(torch.randn(b, 6, dtype=torch.float64), dim=1) for b in (5, 4, 3)]
    for keys in added:
        queue.enqueue(keys)
    queue.dequeue(2)
    held = torch.cat(added)[-10:][2:]  # the newest 10 rows, minus the 2 oldest
    assert len(queue) == 8
    q, k, _ = inputs(4, 6, 1)
    check(backend, q, k, queue, 0.3, True, "none", rtol=1e-8, atol=1e-12, ref_queue=held)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_key_queue_leaves_only_the_positive(backend):
    q, k, _ = inputs(3, 4, 1)
    loss = fused_infonce(q, k, KeyQueue(8, 4, dtype=torch.float64), backend=backend, reduction="none")
    assert_close(loss, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = torch.randn(2, 12, 40, dtype=torch.float64)
    q = base[0, :, ::2].requires_grad_()
    k = base[1].T.contiguous().T[:, 1::2].detach().requires_grad_()
    queue = F.normalize(torch.randn(20, 60, dtype=torch.float64), dim=1)[::2, ::3]
    assert not (q.is_contiguous() or k.is_contiguous() or queue.is_contiguous())
    check(backend, q, k, queue, 0.2, True, "none", rtol=1e-8, atol=1e-12)


def test_queue_gets_no_gradient():
    q, k, queue = inputs(4, 8, 16)
    queue.requires_grad_()
    fused_infonce(q, k, queue, backend="torch").backward()
    assert queue.grad is None and q.grad is not None and k.grad is not None


def test_module_wrapper():
    q, k, queue = inputs(5, 6, 30)
    module = InfoNCELoss(0.1, backend="torch")
    assert_close(module(q, k, queue), reference.infonce(q, k, queue, 0.1), rtol=1e-10)


def good():
    return torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(4, 8), torch.randn(5, 8), torch.randn(16, 8)), {}, ValueError, "q and k must have the same shape"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 9)), {}, ValueError, "queue rows must have D=8"),
    ((torch.randn(4), torch.randn(4), torch.randn(16, 4)), {}, ValueError, "q must be 2-D"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8, dtype=torch.float64)), {}, TypeError, "same dtype"),
    ((torch.randint(0, 3, (4, 8)), torch.randint(0, 3, (4, 8)), torch.randn(16, 8)), {}, TypeError, "q must have a floating"),
    ((torch.randn(0, 8), torch.randn(0, 8), torch.randn(16, 8)), {}, ValueError, "q is empty"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(0, 8)), {}, ValueError, "queue is empty"),
    ((torch.randn(4, 8), torch.randn(4, 8), "queue"), {}, TypeError, "queue must be a torch.Tensor"),
    (good(), {"temperature": 0.0}, ValueError, "temperature"),
    (good(), {"temperature": float("nan")}, ValueError, "temperature"),
    (good(), {"reduction": "avg"}, ValueError, "reduction"),
    (good(), {"normalize": 1}, TypeError, "normalize"),
    (good(), {"backend": "gpu"}, ValueError, "backend"),
    (good(), {"backend": "cuda"}, ValueError, "backend='cuda' is not"),
])
def test_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_infonce(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_weighted", [True, False])
def test_opcheck(backend, with_weighted):
    q, k, queue = inputs(6, 10, 20)
    if not with_weighted:
        q, k = q.detach(), k.detach()
    start, count = torch.tensor(3), torch.tensor(15)
    torch.library.opcheck(infonce_rows, (q, k, queue, start, count, 0.3, with_weighted, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_keeps_no_weighted_sums(backend):
    q, k, queue = inputs(5, 8, 40)
    with torch.no_grad():
        loss = fused_infonce(q, k, queue, backend=backend, reduction="none")
    assert_close(loss, reference.infonce(q, k, queue, reduction="none").detach(), rtol=1e-10)
    _, _, weighted = infonce_rows(q.detach(), k.detach(), queue, torch.tensor(0), torch.tensor(40), 0.07, False,
                                  backend)
    assert weighted.shape == (0, 8)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_key_queue():
    torch._dynamo.reset()
    model = torch.nn.Linear(12, 8, dtype=torch.float64)
    queue = KeyQueue(32, 8, dtype=torch.float64)
    queue.enqueue(F.normalize(torch.randn(20, 8, dtype=torch.float64), dim=1))
    x_q, x_k = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    step = lambda a, b: fused_infonce(model(a), model(b).detach(), queue, 0.2)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x_q, x_k)
    (grad,) = torch.autograd.grad(loss, model.weight)
    held = queue.buffer[:20]
    expected = reference.infonce(model(x_q), model(x_k).detach(), held, 0.2)
    (expected_grad,) = torch.autograd.grad(expected, model.weight)
    assert_close(loss, expected, rtol=1e-10)
    assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_against_reference_error(backend, dtype):
    check_within_reference_error(backend, *inputs(256, 128, 16384, dtype, device="cuda"), 0.07, factor=3, ulps=4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_key_queue_loss_never_syncs(backend):
    queue = KeyQueue(4096, 128, device="cuda")
    held = F.normalize(torch.randn(1000, 128, device="cuda"), dim=1)
    q, k, _ = inputs(64, 128, 1, torch.float32, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        queue.enqueue(held)
        loss = fused_infonce(q, k, queue, 0.2, backend=backend)
        grads = torch.autograd.grad(loss, (q, k))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = loss_and_grads(lambda a, b: reference.infonce(a, b, held, 0.2), q, k)
    for a, e in zip((loss, *grads), expected):
        assert_close(a, e, rtol=2e-4, atol=1e-5)
