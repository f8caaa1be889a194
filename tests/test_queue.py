"""KeyQueue: the ring buffer against a deque model, MoCo's _dequeue_and_enqueue, checkpoints."""
import collections

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from contrastive_kernels import KeyQueue, reference
from contrastive_kernels.ops.queue import queue_enqueue
from helpers import cpu_backends

BACKENDS = cpu_backends()


def held_rows(queue):
    """The filled rows, oldest first, read through the public window (no dequeue)."""
    start, count = queue.window()
    rows = (start + torch.arange(int(count))) % queue.size
    return queue.buffer[rows]


class QueueAgainstDeque(RuleBasedStateMachine):
    """Random enqueues and dequeues; a collections.deque(maxlen=size) is the model."""

    @initialize(size=st.integers(1, 12), dim=st.integers(1, 5), backend=st.sampled_from(BACKENDS))
    def make(self, size, dim, backend):
        self.queue = KeyQueue(size, dim, dtype=torch.float64, backend=backend)
        self.model = collections.deque(maxlen=size)
        self.next_id = 0

    @rule(data=st.data())
    def enqueue(self, data):
        batch = data.draw(st.integers(0, self.queue.size))
        # Row r carries its id in every column, so any misplaced row is visible.
        ids = torch.arange(self.next_id, self.next_id + batch, dtype=torch.float64)
        self.next_id += batch
        self.queue.enqueue(ids[:, None].expand(batch, self.queue.dim).contiguous())
        self.model.extend(ids.tolist())

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def dequeue(self, data):
        n = data.draw(st.integers(0, len(self.model)))
        out = self.queue.dequeue(n)
        expected = [self.model.popleft() for _ in range(n)]
        assert out[:, 0].tolist() == expected
        assert (out == out[:, :1]).all()

    @rule()
    def dequeue_too_many_is_refused_without_change(self):
        before = self.queue.state_dict()
        with pytest.raises(ValueError, match="cannot dequeue"):
            self.queue.dequeue(len(self.model) + 1)
        after = self.queue.state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before)

    @invariant()
    def matches_model(self):
        assert len(self.queue) == len(self.model)
        assert held_rows(self.queue)[:, 0].tolist() == list(self.model)


TestQueueAgainstDeque = QueueAgainstDeque.TestCase
TestQueueAgainstDeque.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,batch", [(16, 4), (12, 12), (65, 5), (8, 1)])
def test_storage_equals_moco_dequeue_and_enqueue(backend, size, batch):
    ours = KeyQueue(size, 7, backend=backend)
    moco = reference.MoCoQueue(size, 7)
    for _ in range(2 * size // batch + 3):  # wrap around more than once
        keys = torch.randn(batch, 7)
        ours.enqueue(keys)
        moco.dequeue_and_enqueue(keys)
        assert torch.equal(ours.buffer, moco.rows())
        assert int(ours.head) == int(moco.queue_ptr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_that_do_not_divide_the_size(backend):
    queue = KeyQueue(10, 3, backend=backend)
    stream = torch.randn(7 + 7 + 3 + 9, 3)
    for chunk in stream.split([7, 7, 3, 9]):
        queue.enqueue(chunk)
    assert len(queue) == 10
    assert torch.equal(held_rows(queue), stream[-10:])
    assert int(queue.head) == 26 % 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_restores_contents_head_and_count(backend):
    queue = KeyQueue(9, 4, backend=backend)
    queue.enqueue(torch.randn(7, 4))
    queue.enqueue(torch.randn(5, 4))
    queue.dequeue(3)
    restored = KeyQueue(9, 4, backend=backend)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.buffer, queue.buffer)
    assert int(restored.head) == int(queue.head) and len(restored) == len(queue) == 6
    new = torch.randn(4, 4)
    queue.enqueue(new)
    restored.enqueue(new)
    assert torch.equal(restored.buffer, queue.buffer)
    with pytest.raises(ValueError, match="shape"):
        KeyQueue(8, 4).load_state_dict(queue.state_dict())


def test_enqueue_accepts_non_contiguous_keys():
    queue = KeyQueue(6, 3)
    keys = torch.randn(3, 8)[:, ::3]
    queue.enqueue(keys)
    assert torch.equal(held_rows(queue), keys)


@pytest.mark.parametrize("keys,error,match", [
    (torch.randn(9, 4), ValueError, "larger than the queue"),
    (torch.randn(3, 5), ValueError, r"shape \(B, 4\)"),
    (torch.randn(4), ValueError, r"shape \(B, 4\)"),
    (torch.randn(3, 4, dtype=torch.float64), ValueError, "dtype"),
    (torch.randn(3, 4, device="meta"), ValueError, "on meta"),
    ([[0.0] * 4], TypeError, "torch.Tensor"),
])
def test_bad_enqueue_is_refused_and_changes_nothing(keys, error, match):
    queue = KeyQueue(8, 4)
    queue.enqueue(torch.randn(5, 4))
    before = queue.state_dict()
    with pytest.raises(error, match=match):
        queue.enqueue(keys)
    after = queue.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(size=0, dim=4), ValueError, "size"),
    (dict(size=4, dim=0), ValueError, "dim"),
    (dict(size=4, dim=2, dtype=torch.int64), TypeError, "dtype"),
    (dict(size=4, dim=2, backend="nope"), ValueError, "backend"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        KeyQueue(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    buffer = torch.randn(10, 3)
    torch.library.opcheck(queue_enqueue, (buffer, torch.tensor(8), torch.tensor(9), torch.randn(4, 3), backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_enqueue_never_syncs_and_matches_cpu(backend):
    gpu, cpu = KeyQueue(50, 16, device="cuda", backend=backend), KeyQueue(50, 16, backend="cpu")
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [torch.randn(b, 16, device="cuda") for b in (7, 20, 33, 50, 1)]
        for keys in batches:
            gpu.enqueue(keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for keys in batches:
        cpu.enqueue(keys.cpu())
    assert torch.equal(gpu.buffer.cpu(), cpu.buffer)
    assert int(gpu.head) == int(cpu.head) and len(gpu) == len(cpu)
