"""momentum_update against MoCo's loop and a float64 oracle, on every backend that runs here."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contrastive_kernels import reference
from contrastive_kernels.ops import momentum as momentum_ops
from contrastive_kernels.ops.momentum import flatten_parameters, momentum_update, momentum_update_op
from helpers import cpu_backends, worst

BACKENDS = cpu_backends()
MOMENTA = [0.0, 0.5, 0.999, 1.0]
# Odd sizes on purpose: 1, 3, a tail after 1000, one past the Triton block of 4096, and shapes.
SHAPES = [(1,), (3,), (1000,), (4097,), (7, 13), (3, 5, 2, 2), (64,)]


def make(shapes, dtype=torch.float32, online_dtype=None, *, flat=False, seed=None, device="cpu"):
    """Fresh random (target, online) lists; with flat=True each list is views of one buffer, in
    order (the layout flatten_parameters makes and backend='triton' needs)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    sizes = [math.prod(s) for s in shapes]
    lists = []
    for dt in (dtype, online_dtype or dtype):
        values = torch.randn(sum(sizes), dtype=torch.float64, generator=gen).to(device, dt)
        if flat:
            lists.append([v.view(s) for v, s in zip(values.split(sizes), shapes)])
        else:
            lists.append([v.clone().view(s) for v, s in zip(values.split(sizes), shapes)])
    return lists[0], lists[1]


def layout_for(backend):
    return dict(flat=backend == "triton")


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def assert_update(actual, target0, online0, momentum, *, ulps, name="target"):
    """Each actual[i] is m * target0[i] + (1 - m) * online0[i] to within `ulps` units of rounding
    of actual's dtype at the scale of the two terms, m|t| + (1 - m)|o| (the result itself may
    cancel to ~0, so a bound relative to it would be meaningless). Oracle in float64."""
    for i, (a, t, o) in enumerate(zip(actual, target0, online0)):
        assert a.shape == t.shape and a.dtype == t.dtype, f"{name}[{i}]: shape or dtype changed"
        t64, o64 = t.double(), o.double()
        exact = momentum * t64 + (1.0 - momentum) * o64
        bound = ulps * torch.finfo(a.dtype).eps * (momentum * t64.abs() + (1.0 - momentum) * o64.abs())
        diff = (a.detach().double() - exact).abs()
        if not bool((diff <= bound).all()):
            raise AssertionError(f"{name}[{i}] (m={momentum}): {int((diff > bound).sum())} of {diff.numel()} "
                                 f"values beyond {ulps} ulp; worst:\n{worst(a.detach(), exact)}")


def moco_loop(target, online, momentum):
    expected = snapshot(target)
    reference.momentum_update(expected, online, momentum)
    return expected


# ---------------------------------------------------------------------------------------
# Values: every backend against MoCo's loop and the float64 oracle.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", MOMENTA)
def test_matches_moco_loop(backend, dtype, momentum):
    target, online = make(SHAPES, dtype, **layout_for(backend))
    target0, online0 = snapshot(target), snapshot(online)
    expected = moco_loop(target, online, momentum)
    momentum_update(target, online, momentum, backend=backend)
    # Both sides round m*t and (1-m)*o and their sum: a couple of ulp apart at most.
    assert_update(target, target0, online0, momentum, ulps=4)
    assert_update(expected, target0, online0, momentum, ulps=4, name="moco loop")
    for i, (a, e) in enumerate(zip(target, expected)):
        scale = momentum * target0[i].abs() + (1 - momentum) * online0[i].abs()
        assert bool(((a - e).abs() <= 4 * torch.finfo(dtype).eps * scale).all()), f"target[{i}] vs MoCo loop"
    assert all(torch.equal(o, o0) for o, o0 in zip(online, online0)), "online was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_momentum_one_and_zero_are_exact(backend, dtype):
    target, online = make(SHAPES, dtype, **layout_for(backend))
    target0 = snapshot(target)
    momentum_update(target, online, 1.0, backend=backend)
    assert all(torch.equal(t, t0) for t, t0 in zip(target, target0)), "m=1 changed the target"
    momentum_update(target, online, 0, backend=backend)  # an int momentum is a number too
    assert all(torch.equal(t, o) for t, o in zip(target, online)), "m=0 did not copy online"


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_moco_loop(backend):
    def encoder():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 5 * 5, 17), torch.nn.LayerNorm(17))

    online = encoder()
    target = encoder()
    if backend == "triton":
        flatten_parameters(online)
        flatten_parameters(target)
    expected = copy.deepcopy(target)
    target0 = snapshot(target.parameters())
    buffers0 = snapshot(target.buffers())
    with torch.no_grad():  # the parameters of a fresh module require grad
        momentum_update(target, online, 0.99, backend=backend)
    reference.momentum_update(expected, online, 0.99)
    assert_update(list(target.parameters()), target0, list(online.parameters()), 0.99, ulps=4)
    for a, e in zip(target.parameters(), expected.parameters()):
        assert torch.allclose(a, e, rtol=1e-6, atol=1e-7)
        assert isinstance(a, torch.nn.Parameter) and a.requires_grad and a.grad_fn is None
    # Parameters only, as in MoCo: BatchNorm's running statistics are buffers and stay.
    assert all(torch.equal(b, b0) for b, b0 in zip(target.buffers(), buffers0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors(backend):
    # A ResNet-like mix: hundreds of tensors, most of them small.
    gen = torch.Generator().manual_seed(0)
    count = 60 if backend == "triton" else 400
    shapes = [(int(n),) for n in torch.randint(1, 300, (count,), generator=gen)] + [(70, 70), (5000,)]
    target, online = make(shapes, torch.float32, seed=1, **layout_for(backend))
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.9, backend=backend)
    assert_update(target, target0, online0, 0.9, ulps=4)


def test_cpu_spreads_over_threads_and_pieces():
    # Enough values that at::parallel_for cuts the range into pieces that start and end inside
    # tensors; every value must be updated exactly once.
    shapes = [(100_003,), (7,), (200_000,), (1,), (65_536,), (65_537,), (3, 11)]
    target, online = make(shapes, torch.float64, seed=2)
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.3, backend="cpu")
    assert_update(target, target0, online0, 0.3, ulps=4)


# ---------------------------------------------------------------------------------------
# Low precision: an fp32 EMA of bf16/fp16 weights, and same-dtype fp16/bf16.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("online_dtype", [torch.bfloat16, torch.float16])
def test_float32_target_low_precision_online(backend, online_dtype):
    target, online = make(SHAPES, torch.float32, online_dtype, **layout_for(backend))
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.999, backend=backend)
    assert all(t.dtype == torch.float32 for t in target)
    assert_update(target, target0, online0, 0.999, ulps=4)
    # The point of an fp32 target: the 1e-3-sized step survives (a bf16 EMA rounds it away).
    changed = sum(int((t != t0).sum()) for t, t0 in zip(target, target0))
    assert changed >= 0.99 * sum(t.numel() for t in target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_low_precision_same_dtype(backend, dtype, momentum):
    # Computed in float32 and rounded once: within one ulp of the exact result, where MoCo's loop
    # in the same dtype rounds three times.
    target, online = make(SHAPES, dtype, **layout_for(backend))
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, momentum, backend=backend)
    assert_update(target, target0, online0, momentum, ulps=1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mixed_dtype_pairs_in_one_call(backend):
    # Every pairing in one list, including a float64 side (computed in float64).
    dtypes = [(torch.float32, torch.bfloat16), (torch.float64, torch.float32), (torch.bfloat16, torch.float32),
              (torch.float16, torch.float64), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)]
    target, online = [], []
    for i, (dt_t, dt_o) in enumerate(dtypes):
        t, o = make([(37, 3)], dt_t, dt_o, seed=i)
        target += t
        online += o
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.7, backend=backend)
    assert [t.dtype for t in target] == [dt for dt, _ in dtypes]
    assert_update(target, target0, online0, 0.7, ulps=2)


def test_triton_float64_uses_float64_momentum():
    # A momentum passed to the kernel as fp32 would be off by ~1e-8 relative.
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    target, online = make([(513,)], torch.float64, flat=True)
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.1 + 1e-12, backend="triton")
    assert_update(target, target0, online0, 0.1 + 1e-12, ulps=4)


# ---------------------------------------------------------------------------------------
# Layouts: non-contiguous tensors (cpu and torch handle them, triton rejects them), empty ones.
# ---------------------------------------------------------------------------------------
def non_contiguous_pairs():
    """Transposed and column-strided targets, and a transposed online tensor; also the target's base."""
    base_t, base_o = torch.randn(2, 30, 40, dtype=torch.float64), torch.randn(30, 40, 2, dtype=torch.float64)
    target = [base_t[0].T, base_t[1, :, ::3], torch.randn(5, 6, dtype=torch.float64)]
    online = [base_o[..., 0].T.contiguous(), base_o[:, ::3, 1], torch.randn(6, 5, dtype=torch.float64).T]
    assert not any(t.is_contiguous() for t in target[:2]) and not online[2].is_contiguous()
    return target, online, base_t


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_non_contiguous_updated_in_place(backend):
    target, online, base = non_contiguous_pairs()
    target0, online0, base0 = snapshot(target), snapshot(online), base.clone()
    momentum_update(target, online, 0.8, backend=backend)
    assert_update(target, target0, online0, 0.8, ulps=4)  # read through the views: in place
    # Only where the views look: the columns between target[1]'s are untouched.
    assert torch.equal(base[1, :, 1::3], base0[1, :, 1::3]) and torch.equal(base[1, :, 2::3], base0[1, :, 2::3])


def test_triton_rejects_non_flat_layouts_and_changes_nothing():
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    flat_t, flat_o = make([(4,), (5,)], flat=True)
    separate_t, separate_o = make([(4,), (5,)])
    cases = [(separate_t, separate_o), (flat_t, separate_o), (separate_t, flat_o),
             (flat_t[::-1], flat_o[::-1]), non_contiguous_pairs()[:2]]
    for target, online in cases:
        before = snapshot(target)
        with pytest.raises(ValueError, match="flatten_parameters"):
            momentum_update(target, online, 0.5, backend="triton")
        assert all(torch.equal(t, b) for t, b in zip(target, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists_and_empty_tensors(backend):
    momentum_update([], [], 0.5, backend=backend)
    target, online = make([(0,), (3,), (2, 0), (5,)], torch.float32, **layout_for(backend))
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.25, backend=backend)
    assert_update(target, target0, online0, 0.25, ulps=4)


def test_single_tensors_and_generators():
    target, online = torch.randn(10), torch.randn(10)
    t0 = target.clone()
    momentum_update(target, online, 0.5)
    assert_update([target], [t0], [online], 0.5, ulps=2)
    targets, onlines = make([(3,), (4,)])
    targets0 = snapshot(targets)
    momentum_update((t for t in targets), iter(onlines), 0.5)
    assert_update(targets, targets0, onlines, 0.5, ulps=2)


# ---------------------------------------------------------------------------------------
# Autograd: no graph, and a target that requires grad only outside grad mode.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_target_under_no_grad(backend):
    target, online = make([(6,), (7, 2)], **layout_for(backend))
    for t in target:
        t.requires_grad_()
    for o in online:
        o.requires_grad_()
    target0, online0 = snapshot(target), snapshot(online)
    versions = [t._version for t in target]
    with torch.no_grad():
        momentum_update(target, online, 0.6, backend=backend)
    assert_update(target, target0, online0, 0.6, ulps=4)
    assert all(t.grad_fn is None and t.is_leaf for t in target)
    assert all(t._version > v for t, v in zip(target, versions)), "in-place update must bump versions"


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_requiring_grad_records_no_graph(backend):
    target, online = make([(6,), (7, 2)], **layout_for(backend))
    online = [o.requires_grad_() for o in online]
    momentum_update(target, online, 0.6, backend=backend)  # grad mode on, target needs no grad
    assert all(t.grad_fn is None and not t.requires_grad for t in target)


# ---------------------------------------------------------------------------------------
# Hypothesis: lists of random shapes, counts and momenta.
# ---------------------------------------------------------------------------------------
shape_lists = st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shape_lists, momentum=st.floats(0.0, 1.0), backend=st.sampled_from(["torch", "cpu"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_counts_momenta(shapes, momentum, backend, dtype, seed):
    target, online = make(shapes, dtype, seed=seed)
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, momentum, backend=backend)
    assert_update(target, target0, online0, momentum, ulps=4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shape_lists, momentum=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       online_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_hypothesis_triton_interpreter(shapes, momentum, seed, online_dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run CPU tensors without TRITON_INTERPRET=1")
    target, online = make(shapes, torch.float32, online_dtype, flat=True, seed=seed)
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, momentum, backend="triton")
    assert_update(target, target0, online0, momentum, ulps=4)


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and no tensor modified.
# ---------------------------------------------------------------------------------------
def good_then(bad_target=None, bad_online=None):
    """Two valid pairs followed by a third pair (valid unless replaced): a partial update would
    show in the first two."""
    target, online = make([(4,), (3, 2), (5,)])
    if bad_target is not None:
        target[2] = bad_target
    if bad_online is not None:
        online[2] = bad_online
    return target, online


BAD_INPUTS = [
    (lambda: (good_then()[0], good_then()[1][:2]), {}, ValueError, "as many tensors"),
    (lambda: good_then(bad_online=torch.randn(6)), {}, ValueError,
     r"target\[2\] and online\[2\] must have the same shape"),
    (lambda: good_then(bad_online=torch.randn(5, 1)), {}, ValueError, "same shape"),
    (lambda: good_then(bad_online=torch.randn(5, device="meta")), {}, ValueError, r"online\[2\] is on meta"),
    (lambda: good_then(bad_target=torch.arange(5)), {}, TypeError, r"target\[2\] must be float16"),
    (lambda: good_then(bad_online=torch.ones(5, dtype=torch.int32)), {}, TypeError, r"online\[2\] must be float16"),
    (lambda: good_then(bad_online=torch.ones(5, dtype=torch.complex64)), {}, TypeError, r"online\[2\]"),
    (lambda: good_then(bad_online=[1.0] * 5), {}, TypeError, r"online\[2\] must be a torch.Tensor"),
    (lambda: (good_then()[0], 3.0), {}, TypeError, "online must be an nn.Module"),
    (lambda: ("weights", good_then()[1]), {}, TypeError, "target must be an nn.Module"),
    (good_then, {"momentum": -0.1}, ValueError, "momentum must be a finite number in"),
    (good_then, {"momentum": 1.0 + 1e-9}, ValueError, "momentum"),
    (good_then, {"momentum": float("nan")}, ValueError, "momentum"),
    (good_then, {"momentum": float("inf")}, ValueError, "momentum"),
    (good_then, {"momentum": "0.9"}, TypeError, "momentum must be a float"),
    (good_then, {"momentum": True}, TypeError, "momentum must be a float"),
    (good_then, {"momentum": torch.tensor(0.9)}, TypeError, "momentum must be a float"),
    (good_then, {"backend": "fastest"}, ValueError, "backend must be one of"),
    (good_then, {"backend": "cuda"}, ValueError, "backend='cuda' is not available"),
]


@pytest.mark.parametrize("build,kwargs,error,match", BAD_INPUTS)
def test_bad_input_names_the_argument_and_changes_nothing(build, kwargs, error, match):
    target, online = build()
    tensors = [t for side in (target, online) if isinstance(side, list) for t in side
               if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = snapshot(tensors)
    with pytest.raises(error, match=match):
        momentum_update(target, online, **{"momentum": 0.5, **kwargs})
    assert all(torch.equal(t, b) for t, b in zip(tensors, before)), "a rejected call modified a tensor"


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_target_requiring_grad_in_grad_mode_is_rejected(backend):
    target, online = make([(4,), (3,)], **layout_for(backend))
    target[1].requires_grad_()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"target\[1\] requires grad.*torch.no_grad"):
        momentum_update(target, online, 0.5, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(target, before))


def test_module_requiring_grad_in_grad_mode_is_rejected():
    target, online = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    before = snapshot(target.parameters())
    with pytest.raises(ValueError, match=r"target\[0\] requires grad"):
        momentum_update(target, online, 0.5)
    assert all(torch.equal(t, b) for t, b in zip(target.parameters(), before))


def test_triton_without_interpreter_or_gpu_is_unavailable(monkeypatch):
    from contrastive_kernels import _backends
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", False)
    target, online = make([(4,)], flat=True)
    with pytest.raises(ValueError, match="backend='triton' is not available.*CUDA tensor"):
        momentum_update(target, online, 0.5, backend="triton")


def test_auto_prefers_triton_only_for_flat_buffers(monkeypatch):
    # On a GPU `auto` resolves to triton first; a non-flat list must then go to cuda or torch
    # (here torch: the cuda backend cannot run CPU tensors) instead of raising.
    monkeypatch.setattr(momentum_ops, "resolve", lambda *args: "triton")
    flat, separate = make([(4,), (5,)], flat=True), make([(4,), (5,)])
    assert momentum_ops._choose("auto", *flat) == "triton"
    assert momentum_ops._choose("auto", *separate) == "torch"
    assert momentum_ops._choose("triton", *separate) == "triton"  # explicit: its own ValueError later


# ---------------------------------------------------------------------------------------
# flatten_parameters
# ---------------------------------------------------------------------------------------
def test_flatten_parameters_keeps_values_identity_and_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    x = torch.randn(3, 5)
    expected = model(x)
    params = list(model.parameters())
    values = snapshot(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flat = flatten_parameters(model)
    assert flat.dim() == 1 and flat.numel() == sum(p.numel() for p in params)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert torch.equal(model(x), expected)
    assert momentum_ops._flat_span(params) is not None
    model(x).sum().backward()
    optimizer.step()  # the optimizer updates the parameters, hence the buffer
    assert torch.equal(flat, torch.cat([p.detach().flatten() for p in params]))
    assert not all(torch.equal(p, v) for p, v in zip(params, values))


def test_flatten_parameters_rejects_mixed_dtypes_and_empty_modules():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match="one dtype"):
        flatten_parameters(model)
    with pytest.raises(ValueError, match="no parameters"):
        flatten_parameters(torch.nn.ReLU())


# ---------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile without graph breaks.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_opcheck(backend):
    # opcheck runs the op on clones of each tensor, which lose a flat layout: triton gets one
    # tensor per list, which is flat by itself.
    shapes = [(12,)] if backend == "triton" else [(3, 4), (5,)]
    target, online = make(shapes, torch.float64)
    torch.library.opcheck(momentum_update_op, (target, online, 0.9, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    online = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4)).double()
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    expected = copy.deepcopy(target)
    # Functionalization clones each mutated tensor, so a list of views loses its flat layout
    # inside a compiled graph: under torch.compile, triton gets the flat buffers themselves.
    args = (flatten_parameters(target), flatten_parameters(online)) if backend == "triton" else (target, online)

    def step(momentum):
        momentum_update(*args, momentum, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    with torch.no_grad():
        compiled(0.9)
        compiled(0.8)
    reference.momentum_update(expected, online, 0.9)
    reference.momentum_update(expected, online, 0.8)
    for a, e in zip(target.parameters(), expected.parameters()):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# GPU: every backend on CUDA tensors (skipped without a GPU).
# ---------------------------------------------------------------------------------------
GPU_SHAPES = [(1,), (3,), (1000,), (4097,), (16384,), (16385,), (64, 3, 7, 7), (2048, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch", "auto"])
@pytest.mark.parametrize("dtype,online_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float32, torch.float16), (torch.float64, torch.float64),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.999, 1.0])
def test_gpu_backends(backend, dtype, online_dtype, momentum):
    target, online = make(GPU_SHAPES, dtype, online_dtype, flat=backend == "triton", seed=3, device="cuda")
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, momentum, backend=backend)
    ulps = 1 if dtype in (torch.float16, torch.bfloat16) else 4
    assert_update(target, target0, online0, momentum, ulps=ulps)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "torch", "auto"])
def test_gpu_many_misaligned_and_non_contiguous(backend):
    # 300 tensors, views starting at odd offsets (the scalar path of the vector kernel) and
    # non-contiguous targets and online tensors.
    base_t, base_o = torch.randn(40_000, device="cuda"), torch.randn(40_000, device="cuda")
    target = [base_t[1 + 131 * i: 1 + 131 * i + 97] for i in range(300)]
    online = [base_o[3 + 131 * i: 3 + 131 * i + 97] for i in range(300)]
    target.append(torch.randn(300, 200, device="cuda").T)
    online.append(torch.randn(400, 200, device="cuda")[::2].T)
    target0, online0 = snapshot(target), snapshot(online)
    momentum_update(target, online, 0.95, backend=backend)
    assert_update(target, target0, online0, 0.95, ulps=4)


@pytest.mark.gpu
def test_gpu_flattened_modules_with_triton_and_auto():
    online = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.BatchNorm1d(200)).cuda()
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    flatten_parameters(online)
    flatten_parameters(target)
    target0, online0 = snapshot(target.parameters()), snapshot(online.parameters())
    for backend in ("triton", "auto"):
        with torch.no_grad():
            momentum_update(target, online, 0.99, backend=backend)
        assert_update(list(target.parameters()), target0, online0, 0.99, ulps=4)
        target0 = snapshot(target.parameters())
