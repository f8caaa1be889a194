"""KeyQueue: MoCo's ring buffer of negative keys, with the head and fill count on the device.

enqueue(keys) writes B <= K rows at the head, wrapping around the end and overwriting the
oldest rows (that is MoCo's dequeue), for any B: no K % B == 0 requirement, and no
device-to-host sync (MoCo's `int(queue_ptr)` stalls the GPU every step and breaks CUDA graphs).

Backends of the enqueue kernel (DESIGN section 4):
  triton  one program per (row block, column block); reads the head on the device; head and
          count then move with two in-place torch ops on the same stream. Tested under
          TRITON_INTERPRET=1 on CPU tensors; on GPUs by the tests marked `gpu`.
  cuda    csrc/cuda/queue.cu: copy kernel + one-thread advance kernel. Compiled in CI only.
  cpu     csrc/cpu/queue.cpp: at most two contiguous runs of memcpy.
  torch   index_copy_ at device-computed rows.
"""
import torch

from .._backends import check_backend_name, resolve, tl, triton

SUPPORTED_BACKENDS = ("triton", "cuda", "cpu", "torch")


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _enqueue_kernel(BUFFER, KEYS, HEAD, size, batch, dim, stride_key_row, stride_key_col,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < batch)[:, None] & (cols < dim)[None, :]
    head = tl.load(HEAD)  # read on the device: no host sync
    keys = tl.load(KEYS + rows[:, None] * stride_key_row + cols[None, :] * stride_key_col, mask=mask)
    slots = (head + rows) % size
    tl.store(BUFFER + slots[:, None] * dim + cols[None, :], keys, mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _advance(head, count, batch, size):
    head.add_(batch).remainder_(size)
    count.add_(batch).clamp_(max=size)


def _triton_enqueue(buffer, head, count, keys):
    batch, dim = keys.shape
    block_r, block_d = 32, min(128, triton.next_power_of_2(dim))
    grid = (triton.cdiv(batch, block_r), triton.cdiv(dim, block_d))
    _enqueue_kernel[grid](buffer, keys.to(buffer.dtype), head, buffer.shape[0], batch, dim,
                          keys.stride(0), keys.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)
    _advance(head, count, batch, buffer.shape[0])


def _torch_enqueue(buffer, head, count, keys):
    slots = (head + torch.arange(keys.shape[0], device=buffer.device)) % buffer.shape[0]
    buffer.index_copy_(0, slots, keys.to(buffer.dtype))
    _advance(head, count, keys.shape[0], buffer.shape[0])


def _native_enqueue(buffer, head, count, keys):
    torch.ops.contrastive_kernels.queue_enqueue_(buffer, head, count, keys)


_ENQUEUE = {"triton": _triton_enqueue, "cuda": _native_enqueue, "cpu": _native_enqueue,
            "torch": _torch_enqueue}


# ----------------------------------------------------------------------------------------
# Registered op
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive_kernels::queue_enqueue", mutates_args=("buffer", "head", "count"))
def queue_enqueue(buffer: torch.Tensor, head: torch.Tensor, count: torch.Tensor, keys: torch.Tensor,
                  backend: str) -> None:
    """Writes keys at the head of the ring buffer and advances head and count, on the device."""
    chosen = resolve("KeyQueue.enqueue", backend, buffer.device, SUPPORTED_BACKENDS)
    _ENQUEUE[chosen](buffer, head, count, keys.detach())


@queue_enqueue.register_fake
def _(buffer, head, count, keys, backend):
    return None


# ----------------------------------------------------------------------------------------
# Public class
# ----------------------------------------------------------------------------------------
class KeyQueue:
    """A (size, dim) ring buffer of keys; the newest `size` enqueued rows are the negatives.

    `.buffer` is the storage, `.head` the next row to write and `.count` the filled rows (int64
    scalar tensors on the buffer's device). The filled rows are `(head - count + i) mod size`
    for i < count, oldest first.
    """

    def __init__(self, size, dim, *, dtype=torch.float32, device=None, backend="auto"):
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        check_backend_name(backend)
        self.size, self.dim, self.backend = size, dim, backend
        self.buffer = torch.zeros(size, dim, dtype=dtype, device=device)
        self.head = torch.zeros((), dtype=torch.int64, device=self.buffer.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.buffer.device)

    @torch.no_grad()
    def enqueue(self, keys, group=None):
        """Writes the B rows of `keys` (B <= size) at the head, overwriting the oldest rows.

        With a torch.distributed `group`, every rank's keys are gathered in rank order and
        enqueued (MoCo's concat_all_gather): all ranks then hold identical queues. Every rank
        must call it, with the same B."""
        if group is None:
            self._check_keys(keys, 1)
        else:
            from ..distributed import all_gather_keys

            keys = all_gather_keys(keys, group, self._check_keys)
        if keys.shape[0] == 0:
            return
        queue_enqueue(self.buffer, self.head, self.count, keys, self.backend)

    def _check_keys(self, keys, world):
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        if keys.shape[0] * world > self.size:
            what = f"{world} ranks x {keys.shape[0]} keys" if world > 1 else f"a batch of {keys.shape[0]} keys"
            raise ValueError(f"{what} is larger than the queue ({self.size} rows)")
        if keys.dtype != self.buffer.dtype:
            raise ValueError(f"keys have dtype {keys.dtype}, the queue holds {self.buffer.dtype}")
        if keys.device != self.buffer.device:
            raise ValueError(f"keys are on {keys.device}, the queue is on {self.buffer.device}")

    def window(self):
        """(start, count) of the filled rows as device scalars, without a host sync."""
        return (self.head - self.count) % self.size, self.count

    @torch.no_grad()
    def dequeue(self, n):
        """Removes and returns the n oldest rows, oldest first (this reads the count: a host sync)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        held = len(self)
        if n > held:
            raise ValueError(f"cannot dequeue {n} rows: the queue holds {held}")
        start, _ = self.window()
        rows = (start + torch.arange(n, device=self.buffer.device)) % self.size
        out = self.buffer.index_select(0, rows)
        self.count.sub_(n)
        return out

    def __len__(self):
        return int(self.count)

    def state_dict(self):
        return {"buffer": self.buffer.clone(), "head": self.head.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(f"state buffer has shape {tuple(state['buffer'].shape)}, "
                             f"this queue {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.head.copy_(state["head"])
        self.count.copy_(state["count"])

    def __repr__(self):
        return (f"KeyQueue(size={self.size}, dim={self.dim}, dtype={self.buffer.dtype}, "
                f"device={self.buffer.device})")
