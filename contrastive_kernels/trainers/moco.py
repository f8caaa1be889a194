"""MoCo v2: a query encoder trained by SGD, a key encoder that is its EMA, and a queue of past
keys as the negatives of InfoNCE."""
import math

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import infonce as infonce_op, momentum as momentum_op, queue as queue_op
from ..ops.infonce import fused_infonce
from ..ops.momentum import flatten_parameters, momentum_update
from ..ops.queue import KeyQueue
from .engine import Trainer, check_positive_int, key_encoder_copy


class MoCoTrainer(Trainer):
    """MoCo v2 (Chen et al., 2020) on `momentum_update`, `KeyQueue` and `fused_infonce`.

    Per step: EMA of the key encoder, keys of view b (shuffled into `shuffle_bn` BatchNorm groups
    so a query and its key never share batch statistics), InfoNCE of view a's queries against
    the keys and the queue, SGD step, then the keys enter the queue. On a GPU nothing in the
    step reads a value back to the host. The queue starts as random unit vectors, as in MoCo.
    With backend="torch": reference.infonce, MoCo's per-parameter EMA loop and MoCo's queue
    (which reads its pointer to the host every step): the reference trainer.

    Under torch.distributed every rank's keys enter every rank's queue (KeyQueue.enqueue(group=)),
    and with `shuffle_across_ranks` (the default) the key batch is shuffled over the ranks before
    the key encoder, as MoCo does: the key images of all ranks are gathered, each rank encodes a
    random slice of them (split into `shuffle_bn` BatchNorm groups), and the keys are gathered
    and put back in order. The permutation comes from a generator every rank seeds alike, so
    nothing is broadcast.
    """
    method = "moco"
    ops = {"fused_infonce": infonce_op.SUPPORTED_BACKENDS, "momentum_update": momentum_op.SUPPORTED_BACKENDS,
           "KeyQueue.enqueue": queue_op.SUPPORTED_BACKENDS}
    defaults = {"epochs": 40, "batch_size": 256, "lr": 0.05, "temperature": 0.2, "queue_size": 1024, "momentum": 0.99, "shuffle_bn": 4,
                "symmetric": False}
    method_state = ("key_model", "queue")

    def check_config(self):
        config = self.config
        check_positive_int(config, "queue_size")
        check_positive_int(config, "shuffle_bn")
        if not 0 <= config.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {config.momentum!r}")
        if config.momentum_schedule not in ("constant", "cosine"):
            raise ValueError(f"momentum-schedule must be constant or cosine, got {config.momentum_schedule!r}")
        keys = config.batch_size * (2 if config.symmetric else 1)
        what = f"2 x batch-size ({keys}, symmetric)" if config.symmetric else f"batch-size ({keys})"
        if config.queue_size < config.batch_size:
            raise ValueError(f"queue-size {config.queue_size} is smaller than batch-size {config.batch_size}")
        if config.queue_size < keys:
            raise ValueError(f"queue-size {config.queue_size} is smaller than the keys of a step, {what}")
        if config.backend == "torch" and config.queue_size % keys:
            raise ValueError(f"the reference trainer (backend torch) uses MoCo's queue, which needs queue-size "
                             f"({config.queue_size}) to be a multiple of {what}")
        if config.shuffle_bn > self.local_batch:
            raise ValueError(f"shuffle-bn {config.shuffle_bn} is larger than the batch of a process ({self.local_batch})")

    def build_method(self):
        config = self.config
        self.key_model = key_encoder_copy(self.model)
        if config.backend == "triton":  # Triton's EMA works on one flat buffer per model
            flatten_parameters(self.model)
            flatten_parameters(self.key_model)
        self.key_forward = torch.compile(self.key_model) if config.compile else self.key_model
        initial = F.normalize(torch.randn(config.queue_size, config.projection_dim,
                                          generator=torch.Generator().manual_seed(config.seed + 2)), dim=1)
        if config.backend == "torch":
            self.queue = reference.MoCoQueue(config.queue_size, config.projection_dim, device=self.device)
            self.queue.queue.copy_(initial.T)
        else:
            self.queue = KeyQueue(config.queue_size, config.projection_dim, device=self.device,
                                  backend=config.backend)
            self.queue.enqueue(initial.to(self.device))
        self.keys = None

    def current_momentum(self):
        """`momentum`, or with the cosine schedule rising from it to 1 at the last step (BYOL)."""
        if self.config.momentum_schedule == "constant":
            return self.config.momentum
        progress = self.step / max(1, self.total_steps - 1)
        return 1 - (1 - self.config.momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def key_projections(self, view):
        if self.world > 1 and self.config.shuffle_across_ranks:
            return self.keys_shuffled_across_ranks(view)
        groups = self.config.shuffle_bn
        if groups == 1:
            return self.key_forward(view)
        order = torch.randperm(len(view), generator=self.augment_generator, device=view.device)
        keys = torch.cat([self.key_forward(chunk) for chunk in view[order].chunk(groups)])
        return torch.empty_like(keys).index_copy_(0, order, keys)  # back to the original order

    def keys_shuffled_across_ranks(self, view):
        """MoCo's batch shuffle over the ranks: the same keys as key_forward(view), but each
        BatchNorm group holds a random mix of every rank's images."""
        from ..distributed import all_gather_rows

        every_view = all_gather_rows(view, self.group)
        shared = torch.Generator(view.device).manual_seed(self.config.seed * 1_000_003 + self.step)
        order = torch.randperm(len(every_view), generator=shared, device=view.device)  # alike on every rank
        mine = every_view[order[self.rank * len(view):(self.rank + 1) * len(view)]]
        keys = torch.cat([self.key_forward(chunk) for chunk in mine.chunk(self.config.shuffle_bn)])
        gathered = all_gather_rows(keys, self.group)  # in shuffled order
        every_key = torch.empty_like(gathered).index_copy_(0, order, gathered)
        return every_key[self.rank * len(view):(self.rank + 1) * len(view)]

    def infonce(self, queries, keys):
        if self.config.backend == "torch":
            return reference.infonce(queries, keys, self.queue.rows(), self.config.temperature)
        return fused_infonce(queries, keys, self.queue, self.config.temperature, backend=self.config.backend)

    def training_loss(self, view_a, view_b):
        momentum = self.current_momentum()
        pairs = [(view_a, view_b), (view_b, view_a)] if self.config.symmetric else [(view_a, view_b)]
        with torch.no_grad():
            if self.config.backend == "torch":
                reference.momentum_update(self.key_model, self.model, momentum)
            else:
                momentum_update(self.key_model, self.model, momentum, backend=self.config.backend)
            keys = [F.normalize(self.key_projections(key_view).float(), dim=1) for _, key_view in pairs]
        losses = [self.infonce(self.forward(query_view).float(), k) for (query_view, _), k in zip(pairs, keys)]
        self.keys = torch.cat(keys)
        return sum(losses) / len(losses)

    def after_step(self):
        if self.config.backend == "torch":
            keys = self.keys
            if self.group is not None:  # MoCo's concat_all_gather
                from ..distributed import all_gather_rows

                keys = all_gather_rows(keys, self.group)
            self.queue.dequeue_and_enqueue(keys)
        else:
            self.queue.enqueue(self.keys, group=self.group)
