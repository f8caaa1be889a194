"""`python -m contrastive_kernels train ...`: argument parsing and the run's console output.

Under `torchrun --nproc-per-node=W -m contrastive_kernels train ...` the process group is
made here from torchrun's environment: NCCL with one GPU per process (LOCAL_RANK) on CUDA,
Gloo on CPU. Rank 0 prints and writes; every rank exits with the same code.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .engine import CHECKPOINT, CURVES, METRICS, TRAINER_BACKENDS, TrainConfig
from .moco import MoCoTrainer
from .simclr import SimCLRTrainer

TRAINERS = {"simclr": SimCLRTrainer, "moco": MoCoTrainer}


def add_parser(commands):
    parser = commands.add_parser(
        "train", help="train SimCLR or MoCo on the built-in digits, CIFAR-10 or an image folder",
        description="Train SimCLR or MoCo with the fused ops. Unset options take the method's defaults "
                    "(SimCLRTrainer.defaults / MoCoTrainer.defaults).")
    add = parser.add_argument
    defaults = TrainConfig()

    def method_default(name):
        values = [f"{method} {cls.defaults[name]}" for method, cls in TRAINERS.items() if name in cls.defaults]
        return f"(default: {', '.join(values)})"

    add("--method", choices=sorted(TRAINERS), required=True)
    add("--data", default=defaults.data, help="digits (built in), cifar10:<dir> or folder:<dir> (default: digits)")
    add("--epochs", type=int, help=method_default("epochs"))
    add("--batch-size", type=int, help=method_default("batch_size"))
    add("--lr", type=float, help="base learning rate of SGD with momentum 0.9, cosine after warm-up " + method_default("lr"))
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--warmup-epochs", type=int, default=defaults.warmup_epochs)
    add("--temperature", type=float, help=method_default("temperature"))
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:<index> (default: auto)")
    add("--backend", default=defaults.backend, choices=TRAINER_BACKENDS,
        help="the ops' backend; torch runs the pure-PyTorch reference trainer (default: auto)")
    add("--amp", default=defaults.amp, choices=("auto", "bf16", "off"),
        help="bf16 autocast; auto = on for CUDA, off for CPU")
    add("--compile", action="store_true", help="torch.compile the encoders")
    add("--seed", type=int, default=defaults.seed)
    add("--linear-probe", action="store_true", help="also report a linear probe's top-1 after the last epoch")
    add("--queue-size", type=int, help="MoCo: keys in the queue " + method_default("queue_size"))
    add("--momentum", type=float, help="MoCo: EMA momentum of the key encoder " + method_default("momentum"))
    add("--momentum-schedule", choices=("constant", "cosine"), default=defaults.momentum_schedule,
        help="MoCo: cosine raises the momentum towards 1 over the run")
    add("--shuffle-bn", type=int, help="MoCo: BatchNorm groups of the shuffled key batch, 1 = off " + method_default("shuffle_bn"))
    add("--shuffle-across-ranks", action=argparse.BooleanOptionalAction, default=None,
        help="MoCo under torchrun: shuffle the key batch over the processes before BatchNorm (default: on)")
    add("--symmetric", action=argparse.BooleanOptionalAction, default=None,
        help="MoCo: both views serve as queries and as keys, the two losses averaged " + method_default("symmetric"))
    add("--out", help="output directory (default: runs/<method>-<data>)")
    add("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    add("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    return parser


OPTIONS = ("data", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "temperature", "device",
           "backend", "amp", "compile", "seed", "linear_probe", "queue_size", "momentum", "momentum_schedule",
           "shuffle_bn", "symmetric", "shuffle_across_ranks")


def init_distributed(device):
    """Joins torchrun's process group (if started by torchrun); returns the device to train on."""
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if on_cuda else "gloo")
    if not on_cuda:  # W processes share the CPU cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device


def run(args):
    """Returns the exit code: 0, or 2 with one line on stderr (and nothing written) for bad input."""
    args.device = init_distributed(args.device)
    try:
        return _run(args, rank=dist.get_rank() if dist.is_initialized() else 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank):
    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    data_name = args.data.replace(":", "-").replace("/", "_").strip("_")
    out = Path(args.out or f"runs/{args.method}-{data_name}")
    try:
        if args.method == "simclr":
            moco_only = [f"--{n.replace('_', '-')}" for n in ("queue_size", "momentum", "shuffle_bn", "symmetric",
                                                               "shuffle_across_ranks") if n in options]
            if moco_only:
                raise ValueError(f"{', '.join(moco_only)} only apply to --method moco")
        checkpoint = out / CHECKPOINT
        if args.resume and not checkpoint.exists():
            raise ValueError(f"--resume: {checkpoint} does not exist")
        if not args.resume and checkpoint.exists():
            raise ValueError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
        trainer = TRAINERS[args.method](**options)
        if args.resume:
            trainer.load_checkpoint(checkpoint)
    except (ValueError, TypeError) as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    if rank != 0:
        trainer.fit(out, progress=False)
        return 0
    if progress:
        print(f"{args.method} on {trainer.dataset}, device {trainer.device}, backend {args.backend}, "
              f"{trainer.config.epochs} epochs of {trainer.steps_per_epoch} steps (batch {trainer.config.batch_size}"
              + (f" over {trainer.world} processes" if trainer.world > 1 else "") + ")"
              + (f", resuming after epoch {trainer.epoch}" if args.resume else ""), flush=True)
    history = trainer.fit(out, progress=progress)
    first, last = history[0], history[-1]
    if last["knn_top1"] is not None:
        print(f"kNN top-1 on the held-out split: {last['knn_top1']:.4f} after {last['epoch']} epochs "
              f"({first['knn_top1']:.4f} at random init)")
    print(f"wrote {out / METRICS}, {out / CHECKPOINT}, {out / CURVES}")
    return 0
