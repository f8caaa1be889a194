"""Negatives across processes: fused_ntxent(group=) and KeyQueue.enqueue(group=) on Gloo with
spawned CPU processes at world sizes 2 and 3, against the single-process reference on the
concatenated batch (float64, 1e-9), plus the rows-against-gathered-columns kernels alone."""
import pytest
import torch
import torch.distributed as dist

from contrastive_kernels import KeyQueue, fused_ntxent, reference
from contrastive_kernels._ranks import run_ranks
from contrastive_kernels.nn import NTXentLoss
from contrastive_kernels.ops.ntxent import backward_against, forward_against
from helpers import assert_close, cpu_backends

BACKENDS = cpu_backends()
EXACT = 1e-9  # float64


def global_views(seed, world, n, d, dtype=torch.float64):
    """Every rank's (z_a, z_b), drawn from one seed so each rank can rebuild the whole batch."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype))
            for _ in range(world)]


def rank_rows(world, rank, n):
    """The rows of the concatenated 2NW batch that belong to `rank` (its a rows, then its b rows)."""
    return torch.cat([torch.arange(rank * n, (rank + 1) * n), torch.arange((world + rank) * n, (world + rank + 1) * n)])


# ----------------------------------------------------------------------------------------
# The kernels alone: rows of one rank against the rows of all, in one process
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,n,d", [(2, 1, 3), (3, 5, 17), (4, 33, 40)])
def test_rows_against_gathered_columns_match_the_reference(backend, world, n, d):
    """forward_against / backward_against on rank r's rows and every rank's rows (the layout
    all_gather gives) equal the reference's rows and gradients on the concatenated batch."""
    views = global_views(world * 100 + n, world, n, d)
    temperature = 0.37
    z_a = torch.cat([a for a, _ in views]).requires_grad_(True)
    z_b = torch.cat([b for _, b in views]).requires_grad_(True)
    weights = torch.rand(2 * n * world, dtype=torch.float64)  # an arbitrary upstream gradient
    expected_rows = reference.ntxent(z_a, z_b, temperature, normalize=False, reduction="none")
    grad_a, grad_b = torch.autograd.grad((expected_rows * weights).sum(), [z_a, z_b])
    expected_grad = torch.cat([grad_a, grad_b])
    cols = torch.cat([torch.cat(v) for v in views])  # rank order: a_0, b_0, a_1, b_1, ...
    order = torch.cat([rank_rows(world, r, n) for r in range(world)])  # cols -> global rows
    lse_cols = torch.empty(2 * n * world, dtype=torch.float64)
    for rank in range(world):
        rows = torch.cat(views[rank])
        loss, lse = forward_against(rows, cols, rank * 2 * n, temperature, backend)
        assert_close(loss, expected_rows.detach()[rank_rows(world, rank, n)], rtol=EXACT, name="loss")
        lse_cols[rank * 2 * n:(rank + 1) * 2 * n] = lse
    for rank in range(world):
        rows = torch.cat(views[rank])
        grad = backward_against(rows, cols, lse_cols, weights[order], rank * 2 * n, temperature, backend)
        want = expected_grad[rank_rows(world, rank, n)]
        assert_close(grad, want, rtol=0, atol=EXACT * want.abs().max().item(), name=f"rank {rank} gradient")


# ----------------------------------------------------------------------------------------
# Spawned ranks on Gloo
# ----------------------------------------------------------------------------------------
CASES = [  # (backend, n, d, temperature, normalize, reduction)
    *[(backend, 5, 17, 0.3, True, "mean") for backend in BACKENDS],
    ("cpu", 1, 4, 0.5, False, "sum"),
    ("cpu", 7, 33, 0.1, True, "none"),
    ("torch", 3, 9, 1.7, True, "none"),
]


def ntxent_worker(rank, world, cases):
    """Each case: this rank's loss and input gradients, and the single-process reference on
    the concatenated batch in this process, compared here; returns the worst relative errors."""
    worst = 0.0
    for index, (backend, n, d, temperature, normalize, reduction) in enumerate(cases):
        views = global_views(1000 * world + index, world, n, d)
        z_a, z_b = (t.clone().requires_grad_(True) for t in views[rank])
        out = fused_ntxent(z_a, z_b, temperature, normalize=normalize, reduction=reduction, backend=backend,
                           group=dist.group.WORLD)
        # The upstream gradient of every rank's output, known to every rank.
        upstream = torch.rand(world, *out.shape, generator=torch.Generator().manual_seed(index), dtype=out.dtype)
        grads = torch.autograd.grad((out * upstream[rank]).sum(), [z_a, z_b])
        module = NTXentLoss(temperature, normalize=normalize, reduction=reduction, backend=backend,
                            group=dist.group.WORLD)
        assert torch.equal(module(z_a, z_b), out)
        # The gather-with-gradient baseline of the benchmark follows the same convention.
        gathered = reference.ntxent_all_gather(z_a, z_b, temperature, group=dist.group.WORLD,
                                               normalize=normalize, reduction=reduction)
        gathered_grads = torch.autograd.grad((gathered * upstream[rank]).sum(), [z_a, z_b])

        all_a = torch.cat([a for a, _ in views]).requires_grad_(True)
        all_b = torch.cat([b for _, b in views]).requires_grad_(True)
        ref_rows = reference.ntxent(all_a, all_b, temperature, normalize=normalize, reduction="none")
        reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda rows: rows}[reduction]
        per_rank = [reduce(ref_rows[rank_rows(world, r, n)]) for r in range(world)]
        expected = per_rank[rank]
        if reduction == "mean":  # the mean over ranks is the single-process loss
            total = torch.tensor([out.item()], dtype=torch.float64)
            dist.all_reduce(total)
            global_loss = ref_rows.mean().item()
            assert abs(total.item() / world - global_loss) <= EXACT * abs(global_loss)
        # DDP's convention: this rank's gradient is W times that of the mean over ranks of
        # every rank's (upstream-weighted) output, which is the gradient of their sum.
        target = sum((upstream[r] * per_rank[r]).sum() for r in range(world))
        ref_grads = torch.autograd.grad(target, [all_a, all_b])
        case = f"case {index} {cases[index]}"
        assert_close(out.detach(), expected.detach(), rtol=EXACT, name=f"{case}: loss")
        for name, grad, ref in zip(("z_a", "z_b"), grads, ref_grads):
            want = ref[rank * n:(rank + 1) * n]
            assert_close(grad, want, rtol=0, atol=EXACT * want.abs().max().item(), name=f"{case}: d{name}")
        assert_close(gathered.detach(), expected.detach(), rtol=EXACT, name=f"{case}: gathered loss")
        for name, grad, ref in zip(("z_a", "z_b"), gathered_grads, ref_grads):
            want = ref[rank * n:(rank + 1) * n]
            assert_close(grad, want, rtol=0, atol=EXACT * want.abs().max().item(), name=f"{case}: gathered d{name}")
            worst = max(worst, ((grad - want).abs().max() / want.abs().max()).item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ntxent_across_ranks_equals_the_concatenated_batch(world):
    worst = run_ranks(world, ntxent_worker, CASES)
    assert max(worst) <= EXACT


def queue_worker(rank, world, backends):
    """Every rank enqueues its own keys (batches that wrap around); the queues must be
    identical across ranks and equal to one queue fed the concatenations."""
    for backend in backends:
        size, batch, dim = 11, 2, 3
        queue = KeyQueue(size, dim, dtype=torch.float64, backend=backend)
        single = KeyQueue(size, dim, dtype=torch.float64, backend="torch")
        g = torch.Generator().manual_seed(7)
        for step in range(5):
            every = [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(world)]
            queue.enqueue(every[rank], group=dist.group.WORLD)
            single.enqueue(torch.cat(every))
            for name in ("buffer", "head", "count"):
                assert torch.equal(getattr(queue, name), getattr(single, name)), (backend, step, name)
        gathered = [torch.empty_like(queue.buffer) for _ in range(world)]
        dist.all_gather(gathered, queue.buffer)
        assert all(torch.equal(g_, queue.buffer) for g_ in gathered), backend
    return True


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_queues_are_identical_across_ranks(world):
    assert all(run_ranks(world, queue_worker, BACKENDS))


def misuse_worker(rank, world):
    """Ranks that disagree get a clear error on every rank, never a hang; afterwards the group
    still works."""
    group = dist.group.WORLD

    def raises(call, error, match):
        with pytest.raises(error, match=match):
            call()

    z = torch.randn(4 + (rank == 1), 8)
    raises(lambda: fused_ntxent(z, z, group=group), ValueError, "every rank must pass the same N")
    z = torch.randn(4, 8 + rank)
    raises(lambda: fused_ntxent(z, z, group=group), ValueError, "every rank must pass the same N, D")
    z = torch.randn(4, 8)
    raises(lambda: fused_ntxent(z, z, 0.5 + rank, group=group), ValueError, "temperature")
    raises(lambda: fused_ntxent(z.double() if rank else z, z.double() if rank else z, group=group),
           ValueError, "dtype")
    # One rank's own input is invalid: it gets its own error, the others say which rank failed.
    if rank == 1:
        raises(lambda: fused_ntxent(z, z, -1.0, group=group), ValueError, "temperature must be finite and > 0")
    else:
        raises(lambda: fused_ntxent(z, z, group=group), ValueError, r"rank\(s\) \[1\] rejected their inputs")
    raises(lambda: fused_ntxent(z, z, group="world"), TypeError, "ProcessGroup")

    queue = KeyQueue(8, 3)
    raises(lambda: queue.enqueue(torch.randn(1 + rank, 3), group=group), ValueError, "every rank must pass the same B")
    raises(lambda: queue.enqueue(torch.randn(5, 3), group=group), ValueError, f"{world} ranks x 5 keys is larger")
    assert int(queue.count) == 0
    # Still in step: a good call works on every rank.
    loss = fused_ntxent(z, z, group=group)
    queue.enqueue(torch.randn(2, 3), group=group)
    return loss.item(), int(queue.count)


@pytest.mark.slow
def test_misuse_raises_on_every_rank_instead_of_hanging():
    results = run_ranks(2, misuse_worker, timeout=180)
    assert results[0][1] == results[1][1] == 4


def failing_worker(rank, world):
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()  # waits for rank 1, which never comes


@pytest.mark.slow
def test_a_failing_rank_fails_the_launcher_without_waiting_for_the_others():
    import time

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1:[\\s\\S]*ValueError: rank 1 gives up"):
        run_ranks(2, failing_worker, timeout=120)
    assert time.perf_counter() - start < 60  # rank 0 was stuck in its barrier: killed, not awaited


def test_group_without_a_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    z = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fused_ntxent(z, z, group=object())
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        KeyQueue(8, 8).enqueue(z, group=object())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nccl_world_of_one_equals_the_single_process_op(dtype, tmp_path):
    """The NCCL path (device-side gathers, the handshake read back once) on one GPU: with W=1
    the gathered loss, its gradient and the gathered enqueue equal the plain ops."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        g = torch.Generator(device="cuda").manual_seed(3)
        z_a, z_b = (torch.randn(300, 128, device="cuda", generator=g, dtype=dtype).requires_grad_(True)
                    for _ in range(2))
        plain = fused_ntxent(z_a, z_b, 0.2)
        plain_grads = torch.autograd.grad(plain, [z_a, z_b])
        gathered = fused_ntxent(z_a, z_b, 0.2, group=group)
        gathered_grads = torch.autograd.grad(gathered, [z_a, z_b])
        assert torch.equal(gathered, plain)
        for grad, want in zip(gathered_grads, plain_grads):
            assert torch.equal(grad, want)
        queue, single = KeyQueue(64, 128, device="cuda"), KeyQueue(64, 128, device="cuda")
        keys = torch.randn(40, 128, device="cuda", generator=g)
        for _ in range(3):
            queue.enqueue(keys, group=group)
            single.enqueue(keys)
        assert torch.equal(queue.buffer, single.buffer) and torch.equal(queue.head, single.head)
    finally:
        dist.destroy_process_group()
