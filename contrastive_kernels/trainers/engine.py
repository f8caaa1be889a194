"""What SimCLR and MoCo training share: configuration, data on the device, optimiser and
schedule, the epoch loop, kNN evaluation, checkpoints and the output files.

A method (simclr.py, moco.py) supplies `build_method` (its extra modules and state),
`training_loss(view_a, view_b)` and `after_step()`, and the keys of its state in checkpoints.

Under torch.distributed (torchrun; `group`), `batch_size` is the global batch: every rank
draws the same permutation and trains on its own slice of each batch, the model is wrapped in
DistributedDataParallel, the losses take their negatives from every rank, and rank 0 alone
evaluates (the results are broadcast), prints and writes files. BatchNorm statistics are per
rank, as in DDP without SyncBatchNorm.
"""
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .._backends import BACKENDS, resolve
from . import augment, knn
from .data import ImageDataset, load_dataset
from .models import SmallResNet, feature_dim, projection_head

CHECKPOINT, METRICS, CURVES = "checkpoint.pt", "metrics.jsonl", "curves.png"
TRAINER_BACKENDS = BACKENDS  # "torch" selects the reference trainer: reference.py's eager ops


@dataclass
class TrainConfig:
    """Every setting of a run. `None` means the method's own default (SimCLRTrainer.defaults,
    MoCoTrainer.defaults)."""
    data: str = "digits"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # base learning rate of SGD (momentum 0.9), cosine schedule after warm-up
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    temperature: float | None = None
    projection_dim: int = 64
    hidden_dim: int = 256
    device: str = "auto"  # auto: cuda when available, else cpu
    backend: str = "auto"  # reaches the ops; "torch" runs the pure-PyTorch reference trainer
    amp: str = "auto"  # auto: bf16 autocast on CUDA, off on CPU; or "bf16" / "off"
    compile: bool = False  # torch.compile the encoders
    seed: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.1
    linear_probe: bool = False  # also train a linear classifier on frozen features after the last epoch
    # MoCo only
    queue_size: int | None = None
    momentum: float | None = None  # EMA momentum of the key encoder
    momentum_schedule: str = "constant"  # or "cosine": from `momentum` towards 1 over the run
    shuffle_bn: int | None = None  # key batch shuffled and normalised in this many groups (1: off)
    symmetric: bool | None = None  # both views as queries (and both as keys), loss averaged
    shuffle_across_ranks: bool = True  # under torch.distributed: MoCo's batch shuffle of the keys over ranks

    def validate(self):
        for name in ("epochs", "batch_size", "projection_dim", "hidden_dim", "knn_k"):
            check_positive_int(self, name)
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        for name in ("lr", "temperature", "knn_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:index], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for, but torch sees no CUDA GPU")
        if self.backend not in TRAINER_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(TRAINER_BACKENDS)}, got {self.backend!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")


def check_positive_int(config, name):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


def resolve_device(name):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def _atomic_write(path, write):
    """write(tmp_path), then rename: an interrupted run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class Trainer:
    """The shared loop. Subclasses: SimCLRTrainer, MoCoTrainer.

    trainer = SimCLRTrainer(encoder=None, data="digits", epochs=30, ...)   # TrainConfig fields
    history = trainer.fit(out="runs/simclr")                              # list of dicts

    group: "auto" (torch.distributed's default group when it is initialised, else a single
    process), None (a single process), or a ProcessGroup.
    """
    method = None
    ops = {}  # name -> supported backends of the ops the method calls
    defaults = {}  # the method's values for TrainConfig fields left at None
    method_state = ()  # attributes saved in checkpoints besides the model and optimiser

    def __init__(self, encoder=None, *, dataset=None, group="auto", **options):
        unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; see TrainConfig")
        config = TrainConfig(**options)
        if dataset is not None and "data" not in options:
            config.data = dataset.name  # recorded in checkpoints
        for name, value in self.defaults.items():
            if getattr(config, name) is None:
                setattr(config, name, value)
        config.validate()
        self.config = config
        if group == "auto":
            group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        self.group = group
        self.rank, self.world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        if config.batch_size % self.world:
            raise ValueError(f"batch-size {config.batch_size} (the global batch) must be a multiple of the "
                             f"{self.world} processes")
        self.local_batch = config.batch_size // self.world
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        if not isinstance(self.dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(self.dataset).__name__}")
        if config.batch_size > len(self.dataset.train_images):
            raise ValueError(f"batch-size {config.batch_size} is larger than the training split of "
                             f"{self.dataset.name} ({len(self.dataset.train_images)} images)")
        self.check_config()

        self.device = resolve_device(config.device)
        if config.backend != "torch":
            # A backend an op lacks is an error now, not after the first epoch; and a first-use
            # JIT build of csrc/ happens here, outside the timed epochs.
            for name, supported in self.ops.items():
                resolve(name, config.backend, self.device, supported)
        self.amp = config.amp == "bf16" or (config.amp == "auto" and self.device.type == "cuda")
        self.recipe = augment.RECIPES[self.dataset.recipe]
        self.mean, self.std = (t.to(self.device) for t in self.dataset.channel_stats())
        self.train_images = self.dataset.train_images.to(self.device)
        self.steps_per_epoch = len(self.train_images) // config.batch_size  # the last partial batch is dropped
        self.total_steps = config.epochs * self.steps_per_epoch

        torch.manual_seed(config.seed)  # model initialisation
        if encoder is None:
            encoder = SmallResNet(in_channels=self.dataset.channels)
        encoder = encoder.to(self.device)
        example = augment.prepare_eval(self.train_images[:1], self.recipe, self.mean, self.std)
        head = projection_head(feature_dim(encoder, example[0]), config.hidden_dim, config.projection_dim)
        self.model = EncoderWithHead(encoder, head).to(self.device)
        self.build_method()
        forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(self.model, process_group=group)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9,
                                         weight_decay=config.weight_decay)
        self.data_generator = torch.Generator().manual_seed(config.seed)  # epoch permutations
        # Every rank draws its own augmentations (rank 0 those of a single process).
        self.augment_generator = torch.Generator(self.device).manual_seed(config.seed + 1 + 7919 * self.rank)
        self.step = 0
        self.epoch = 0
        self.history = []
        self.forward = torch.compile(forward) if config.compile else forward

    # -- hooks for the methods -----------------------------------------------------------------
    def check_config(self):
        """Method-specific checks of self.config against self.dataset (ValueError)."""

    def build_method(self):
        """Create the method's modules and state (after self.model exists)."""

    def training_loss(self, view_a, view_b):
        raise NotImplementedError

    def after_step(self):
        """Runs after each optimiser step (MoCo: enqueue the keys)."""

    # -- schedule ------------------------------------------------------------------------------
    def learning_rate(self, step):
        """Linear warm-up over warmup_epochs, then cosine decay to 0 at the last step."""
        warmup = self.config.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return self.config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    # -- evaluation ----------------------------------------------------------------------------
    def features(self, images):
        prepared = augment.prepare_eval(images.to(self.device), self.recipe, self.mean, self.std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return knn.encode(self.model.encoder, prepared)

    def evaluate(self, linear_probe=False):
        """kNN top-1 of the encoder features on the held-out split (None without labels)."""
        if self.world > 1:  # rank 0 evaluates, every rank gets its results
            result = [self._evaluate(linear_probe) if self.rank == 0 else None]
            dist.broadcast_object_list(result, src=0, group=self.group)
            return result[0]
        return self._evaluate(linear_probe)

    def _evaluate(self, linear_probe):
        dataset = self.dataset
        if dataset.train_labels is None:
            return {"knn_top1": None}
        bank, queries = self.features(dataset.train_images), self.features(dataset.heldout_images)
        bank_labels, query_labels = dataset.train_labels.to(self.device), dataset.heldout_labels.to(self.device)
        result = {"knn_top1": knn.knn_top1(bank, bank_labels, queries, query_labels,
                                           self.config.knn_k, self.config.knn_temperature)}
        if linear_probe:
            result["linear_top1"] = knn.linear_probe_top1(bank, bank_labels, queries, query_labels)
        return result

    # -- training ------------------------------------------------------------------------------
    def train_epoch(self, progress):
        from tqdm.auto import tqdm

        config = self.config
        order = torch.randperm(len(self.train_images), generator=self.data_generator).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, desc=f"{self.method} epoch {self.epoch + 1}/{config.epochs}",
                   unit="step", leave=False, disable=not progress or self.rank != 0)
        for i in range(self.steps_per_epoch):
            first = i * config.batch_size + self.rank * self.local_batch  # this rank's slice of the batch
            loss_sum += self.train_step(self.train_images[order[first:first + self.local_batch]])
            bar.update()
        bar.close()
        if self.world > 1:  # each rank's loss is the mean over its rows: their mean is the global loss
            dist.all_reduce(loss_sum, group=self.group)
            loss_sum /= self.world
        mean_loss = (loss_sum / self.steps_per_epoch).item()
        seconds = time.perf_counter() - start
        return mean_loss, self.steps_per_epoch * config.batch_size / seconds

    def train_step(self, images):
        """One optimiser step on a batch of raw images; returns the loss as a device scalar
        (reading it would be a host sync, so the epoch sums them on the device)."""
        views = augment.augment(torch.cat([images, images]), self.recipe, self.mean, self.std, self.augment_generator)
        return self.step_on_views(*views.chunk(2))

    def step_on_views(self, view_a, view_b):
        """One optimiser step on this rank's two augmented views."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.training_loss(view_a, view_b)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.after_step()
        self.step += 1
        return loss.detach().float()

    def fit(self, out=None, *, resume=False, progress=True, on_epoch_end=None):
        """Train up to config.epochs; returns the metrics history (one dict per epoch, epoch 0 =
        the random-initialisation evaluation). With `out`, writes metrics.jsonl, checkpoint.pt
        (after every epoch) and curves.png there; `resume=True` continues from out/checkpoint.pt.
        `on_epoch_end(record)` is called after each epoch's files are written."""
        out = Path(out) if out is not None else None
        writes = out is not None and self.rank == 0  # under torch.distributed rank 0 writes
        if resume:
            if out is None or not (out / CHECKPOINT).exists():
                raise ValueError(f"nothing to resume: {out / CHECKPOINT if out else 'no out directory'} does not exist")
            self.load_checkpoint(out / CHECKPOINT)
        if writes:
            out.mkdir(parents=True, exist_ok=True)
        progress = progress and self.rank == 0
        if not self.history:
            self._record({"epoch": 0, "loss": None, **self.evaluate(), "images_per_sec": None},
                         out if writes else None, progress)
        while self.epoch < self.config.epochs:
            loss, images_per_sec = self.train_epoch(progress)
            self.epoch += 1
            last = self.epoch == self.config.epochs
            metrics = self.evaluate(linear_probe=last and self.config.linear_probe)
            record = {"epoch": self.epoch, "loss": loss, **metrics, "images_per_sec": images_per_sec}
            if out is not None:
                state = self.checkpoint(record)  # on every rank: it gathers their RNG states
                if writes:
                    _atomic_write(out / CHECKPOINT, lambda path: torch.save(state, path))
            self._record(record, out if writes else None, progress)
            if on_epoch_end is not None:
                on_epoch_end(record)
        if writes:
            from .plots import plot_curves
            _atomic_write(out / CURVES, lambda path: plot_curves(self.history, path, self.method))
        return self.history

    def _record(self, record, out, progress):
        self.history.append(record)
        if out is not None:
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            _atomic_write(out / METRICS, lambda path: path.write_text(lines))
        if progress:
            print(format_record(self.method, record, self.config.epochs), flush=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, record):
        state = {"config": dataclasses.asdict(self.config), "method": self.method, "epoch": self.epoch,
                 "step": self.step, "history": self.history + [record],
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": self._rng_states()}
        for name in self.method_state:
            value = getattr(self, name)
            state[name] = value.state_dict() if hasattr(value, "state_dict") else value
        return state

    def _rng_states(self):
        """Every rank's random states (rank order): a resumed run continues each rank's stream."""
        mine = {"data": self.data_generator.get_state(), "augment": self.augment_generator.get_state(),
                "torch": torch.get_rng_state()}
        if self.world == 1:
            return [mine]
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        return every

    # Settings a resumed run must share with the run it continues (epochs may grow).
    RESUME_MUST_MATCH = ("data", "batch_size", "seed", "projection_dim", "hidden_dim", "queue_size")

    def load_checkpoint(self, path):
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["method"] != self.method:
            raise ValueError(f"{path} is a {state['method']} checkpoint, this is {self.method}")
        for name in self.RESUME_MUST_MATCH:
            if state["config"][name] != getattr(self.config, name):
                raise ValueError(f"cannot resume: {name} was {state['config'][name]!r} in {path}, "
                                 f"now {getattr(self.config, name)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["rng"]) != self.world:
            raise ValueError(f"cannot resume: {path} was written by {len(state['rng'])} process(es), "
                             f"this run has {self.world}")
        rng = state["rng"][self.rank]
        self.data_generator.set_state(rng["data"].cpu())
        self.augment_generator.set_state(rng["augment"].cpu())
        torch.set_rng_state(rng["torch"].cpu())
        for name in self.method_state:
            value = getattr(self, name)
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(state[name])
            else:
                setattr(self, name, state[name])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


def format_record(method, record, epochs):
    knn_text = "n/a (no labels)" if record["knn_top1"] is None else f"{record['knn_top1']:.4f}"
    if record["epoch"] == 0:
        return f"{method} epoch 0/{epochs} (random init): kNN top-1 {knn_text}"
    text = (f"{method} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, kNN top-1 {knn_text}, "
            f"{record['images_per_sec']:.0f} images/s")
    if "linear_top1" in record:
        text += f", linear probe top-1 {record['linear_top1']:.4f}"
    return text


class EncoderWithHead(torch.nn.Module):
    """head(encoder(x)): the projections the loss sees; `encoder` alone gives the features."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


def key_encoder_copy(model):
    """A frozen copy of `model` for MoCo's momentum encoder."""
    key_model = copy.deepcopy(model)
    for p in key_model.parameters():
        p.requires_grad_(False)
    return key_model
