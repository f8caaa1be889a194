"""torch.distributed glue: NT-Xent negatives from every rank, and MoCo keys gathered into
every rank's queue. NCCL on GPUs, Gloo on CPUs; whatever process group the user made.

NT-Xent over W ranks (`fused_ntxent(z_a, z_b, group=g)`), each with N local images of dim D:
  the negatives of a rank's 2N rows are the 2N*W rows of all ranks. The convention is DDP's:
  each rank returns the mean (or sum, or the rows) of its own rows' losses, so the mean over
  ranks is the single-process loss of the concatenated batch; each rank's input gradient is
  W times the gradient of that global loss with respect to its rows, so DDP's averaging
  yields the exact global gradient.
Communication, per rank and step:
  handshake  one all-gather of 5 float64 (N, D, dtype, temperature, a local-error flag), so
             ranks that disagree all raise a clear error instead of hanging (on CUDA this
             reads 5W numbers back to the host: one sync);
  forward    one all-gather of the normalised rows: 2N*D elements sent, 2N*D*W received;
  backward   one all-gather of (log-sum-exp, upstream gradient) per row: 4N floats sent.
  Nothing of size N x N moves: the backward is local, because s is symmetric and
  P_ji = exp(s_ij - lse_j) needs only the other ranks' row LSEs (DESIGN section 2). The
  usual gather-with-gradient approach (OpenCLIP, lightly) also all-reduces or reduce-scatters
  the gathered rows' gradients: another 2N*D*W elements per rank.
Every rank must call the backward of a distributed loss (it holds a collective), as DDP does.

`all_gather_keys` is MoCo's concat_all_gather for KeyQueue.enqueue(keys, group=g): every
rank's keys in rank order, so that all ranks hold identical queues.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ops.ntxent import backward_against, forward_against
from ._backends import accumulate_dtype

# all_gather_into_tensor was renamed all_gather_single in torch 2.14.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Groups and the handshake
# ----------------------------------------------------------------------------------------
def rank_and_size(group, op_name):
    """(rank, world size) in `group`, or a clear error when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op_name}: group= was given but torch.distributed is not initialised; "
                           "call torch.distributed.init_process_group first (or pass group=None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op_name}: group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_rank(group), dist.get_world_size(group)


def group_device(group):
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(op_name, group, local_error, fields):
    """All ranks check that every rank passed valid input with the same `fields` (name ->
    int, float or dtype), with one small all-gather. Raises on every rank, or on none."""
    values = [float(_DTYPES.index(v)) if isinstance(v, torch.dtype) else float(v) for v in fields.values()]
    mine = torch.tensor([[float(local_error is not None)] + values], dtype=torch.float64,
                        device=group_device(group))
    every = all_gather_rows(mine, group).tolist()  # on CUDA: the one host sync of the handshake
    failed = [rank for rank, row in enumerate(every) if row[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"{op_name}: rank(s) {failed} rejected their inputs (see their errors)")
    names = list(fields)
    if any(row[1:] != every[0][1:] for row in every):
        def describe(row):
            return ", ".join(f"{name}={_DTYPES[int(v)]}" if isinstance(fields[name], torch.dtype) else f"{name}={v:g}"
                             for name, v in zip(names, row[1:]))
        per_rank = "; ".join(f"rank {rank}: {describe(row)}" for rank, row in enumerate(every))
        raise ValueError(f"{op_name}: every rank must pass the same {', '.join(names)}; got {per_rank}")


def all_gather_rows(x, group):
    """cat of every rank's x (same shape on every rank) along dim 0, in rank order. No autograd."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.detach().contiguous(), group=group)
    return out


# ----------------------------------------------------------------------------------------
# NT-Xent with the negatives of every rank: registered op and autograd
# ----------------------------------------------------------------------------------------
def _group(name):
    return torch.distributed.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("contrastive_kernels::ntxent_gathered", mutates_args=())
def ntxent_gathered(z: torch.Tensor, temperature: float, backend: str,
                    group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses and LSEs of this rank's rows z (2N x D, normalised if asked) against the
    rows of every rank, and those gathered rows (2NW x D; kept for the backward)."""
    group = _group(group_name)
    cols = all_gather_rows(z, group)
    offset = dist.get_rank(group) * z.shape[0]
    loss, lse = forward_against(z, cols, offset, temperature, backend)
    return loss.to(z.dtype), lse, cols


@ntxent_gathered.register_fake
def _(z, temperature, backend, group_name):
    world = dist.get_world_size(_group(group_name))
    rows = z.shape[0]
    return (z.new_empty(rows), z.new_empty(rows, dtype=accumulate_dtype(z)),
            z.new_empty(rows * world, z.shape[1]))


@torch.library.custom_op("contrastive_kernels::ntxent_gathered_backward", mutates_args=())
def ntxent_gathered_backward(z: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor,
                             grad_rows: torch.Tensor, temperature: float, backend: str,
                             group_name: str) -> torch.Tensor:
    """This rank's part of the gradient of sum over all ranks' rows of grad * loss, w.r.t. z.
    Needs every rank's (lse, grad) per row: one all-gather of 4N floats."""
    group = _group(group_name)
    mine = torch.stack([lse, grad_rows.to(lse.dtype)])  # (2, 2N)
    every = all_gather_rows(mine.unsqueeze(0), group)  # (W, 2, 2N)
    lse_cols, grad_cols = every.transpose(0, 1).reshape(2, -1)
    offset = dist.get_rank(group) * z.shape[0]
    return backward_against(z, cols, lse_cols, grad_cols, offset, temperature, backend)


@ntxent_gathered_backward.register_fake
def _(z, cols, lse, grad_rows, temperature, backend, group_name):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, temperature, backend, group_name = inputs
    ctx.save_for_backward(z, output[2], output[1])
    ctx.options = (temperature, backend, group_name)


def _backward(ctx, grad_loss, grad_lse, grad_cols):
    z, cols, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    return ntxent_gathered_backward(z, cols, lse, grad_loss, *ctx.options), None, None, None


ntxent_gathered.register_autograd(_backward, setup_context=_setup_context)


def ntxent(z_a, z_b, temperature, normalize, reduction, backend, group, check_inputs):
    """fused_ntxent(..., group=group): see the module docstring."""
    rank_and_size(group, "fused_ntxent")
    error = None
    try:
        check_inputs()
    except (TypeError, ValueError) as caught:
        error = caught
    fields = {"N": 0, "D": 0, "dtype": torch.float32, "temperature": 0.0}
    if error is None:
        fields = {"N": z_a.shape[0], "D": z_a.shape[1], "dtype": z_a.dtype, "temperature": float(temperature)}
    agree("fused_ntxent", group, error, fields)
    z = torch.cat([z_a, z_b])
    if normalize:
        z = F.normalize(z, dim=1)
    rows, _, _ = ntxent_gathered(z, float(temperature), backend, group.group_name)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ----------------------------------------------------------------------------------------
# MoCo: every rank's keys, in rank order
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def all_gather_keys(keys, group, check_keys):
    """MoCo's concat_all_gather, after a handshake on (B, D, dtype) and each rank's check_keys()."""
    rank_and_size(group, "KeyQueue.enqueue")
    error = None
    try:
        check_keys(keys, dist.get_world_size(group))
    except (TypeError, ValueError) as caught:
        error = caught
    fields = {"B": 0, "D": 0, "dtype": torch.float32}
    if error is None:
        fields = {"B": keys.shape[0], "D": keys.shape[1], "dtype": keys.dtype}
    agree("KeyQueue.enqueue", group, error, fields)
    return all_gather_rows(keys, group)
