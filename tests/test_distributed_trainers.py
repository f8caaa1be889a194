"""The trainers under torch.distributed: a DDP step on W Gloo ranks equals the single-process
step on the full batch, MoCo's shuffle over ranks, and `torchrun ... train` end to end."""
import os
import sys

import pytest
import torch

from contrastive_kernels._ranks import run_ranks
from helpers import read_metrics, run_from_checkout


class PerRankBatchNorm(torch.nn.Module):
    """Runs `module` on each rank's share of the batch, so that one process sees the BatchNorm
    statistics that DDP (without SyncBatchNorm) gives each rank. The batch is `parts` blocks
    (SimCLR: the a views, then the b views) and rank r holds the r-th slice of every block."""

    def __init__(self, module, world, parts):
        super().__init__()
        self.module, self.world, self.parts = module, world, parts

    def forward(self, x):
        blocks = [block.chunk(self.world) for block in x.chunk(self.parts)]
        outputs = [self.module(torch.cat([block[r] for block in blocks])).chunk(self.parts) for r in range(self.world)]
        return torch.cat([torch.cat([outputs[r][p] for r in range(self.world)]) for p in range(self.parts)])


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def ddp_step_worker(rank, world, method):
    import torch.distributed as dist

    from contrastive_kernels.trainers import MoCoTrainer, SimCLRTrainer, augment, load_dataset

    cls = {"simclr": SimCLRTrainer, "moco": MoCoTrainer}[method]
    dataset = load_dataset("digits")
    batch = 24 * world
    options = dict(dataset=dataset, epochs=1, batch_size=batch, backend="cpu")
    if method == "moco":
        options.update(queue_size=240, shuffle_bn=1, shuffle_across_ranks=False)
    distributed = cls(**options)
    single = cls(group=None, **options)
    assert distributed.world == world and single.world == 1
    start = flat(single.model).clone()
    assert torch.equal(flat(distributed.model), start)
    single.forward = PerRankBatchNorm(single.model, world, parts=2 if method == "simclr" else 1)
    if method == "moco":
        single.key_forward = PerRankBatchNorm(single.key_model, world, parts=1)

    # The same global views on every rank; rank r trains on its slice of each.
    recipe = augment.RECIPES[dataset.recipe]
    mean, std = dataset.channel_stats()
    views = augment.augment(torch.cat([dataset.train_images[:batch]] * 2), recipe, mean, std,
                            torch.Generator().manual_seed(5))
    view_a, view_b = views.chunk(2)
    mine = slice(rank * 24, (rank + 1) * 24)
    loss = distributed.step_on_views(view_a[mine], view_b[mine])
    expected = single.step_on_views(view_a, view_b)
    dist.all_reduce(loss)  # each rank's loss is the mean of its rows: their mean is the global loss
    assert abs(loss.item() / world - expected.item()) <= 1e-6 * expected.item(), (loss.item() / world, expected.item())

    # float32 rounding differs (DDP sums the ranks' gradients in another order): measured
    # 1e-7 to 1e-6 of the update; the trainers' fused-vs-reference test allows 5e-5.
    moved = (flat(single.model) - start).norm()
    drift = ((flat(distributed.model) - flat(single.model)).norm() / moved).item()
    assert drift <= 5e-5, f"parameters differ by {drift:.2e} of the update"
    if method == "moco":
        # The EMA ran before the step, from identical weights: the key encoders must agree.
        key_error = (flat(distributed.key_model) - flat(single.key_model)).norm() / flat(single.key_model).norm()
        assert key_error <= 1e-7, f"key encoders differ by {key_error:.2e}"
        queue_error = (distributed.queue.buffer - single.queue.buffer).abs().max().item()
        assert queue_error <= 1e-5, f"queues differ by {queue_error:.2e}"
        for name in ("head", "count"):
            assert torch.equal(getattr(distributed.queue, name), getattr(single.queue, name))
    return drift


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_a_ddp_step_equals_the_single_process_step_on_the_full_batch(method):
    drifts = run_ranks(2, ddp_step_worker, method)
    assert max(drifts) <= 5e-5


def shuffle_worker(rank, world):
    """MoCo's shuffle over ranks gives every image its own key back: exactly so when BatchNorm
    uses running statistics (eval mode), and with other batch statistics in train mode."""
    from contrastive_kernels.trainers import MoCoTrainer, load_dataset

    trainer = MoCoTrainer(dataset=load_dataset("digits"), epochs=1, batch_size=16 * world, backend="cpu",
                          shuffle_bn=2, queue_size=256)
    view = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(rank))
    trainer.key_model.eval()
    plain = trainer.key_model(view)
    shuffled = trainer.key_projections(view)
    assert (shuffled - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    trainer.key_model.train()
    in_own_batch = trainer.key_model(view)
    mixed = trainer.key_projections(view)
    return (mixed - in_own_batch).abs().max().item()


@pytest.mark.slow
def test_moco_shuffles_keys_across_ranks_and_puts_them_back():
    differences = run_ranks(2, shuffle_worker)
    assert min(differences) > 1e-3  # the BatchNorm groups held other ranks' images


def torchrun(*args, cwd):
    torchrun_bin = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return run_from_checkout([torchrun_bin, "--nproc-per-node=2", "-m", "contrastive_kernels", "train", *args],
                             cwd=cwd, timeout=600)


@pytest.mark.slow
def test_torchrun_trains_and_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    result = torchrun("--method", "simclr", "--epochs", "1", "--batch-size", "64", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "over 2 processes" in result.stdout
    assert result.stdout.count("simclr epoch 1/1: loss") == 1  # rank 0 alone prints
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["knn_top1"] > 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # every rank's random state, for --resume

    odd = torchrun("--method", "simclr", "--batch-size", "63", "--out", str(tmp_path / "odd"), cwd=tmp_path)
    assert odd.returncode != 0
    assert "must be a multiple of the 2 processes" in odd.stderr
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_torchrun_on_two_processes_reaches_the_single_process_knn(tmp_path, default_run):
    """The distributed issue's bar: `torchrun --nproc-per-node=2 ... train --method simclr --data
    digits` with the defaults (the same global batch of 128, 64 per process) ends within 0.01
    kNN top-1 of the single-process run. The runs differ in BatchNorm statistics (per process),
    in the augmentations each process draws and in rounding, so their last-epoch kNN are two
    draws of a spread: on one 2-core CPU, seeds 0-3 gave single - torchrun = -0.0044, +0.0022,
    +0.0089, -0.0067 (single-process runs alone spread by 0.006). One seed against one seed
    would fail ~1 run in 8 on another CPU; the mean over seeds 0 and 1 halves the variance."""
    last = {"single": [], "torchrun": []}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        result = torchrun("--method", "simclr", "--data", "digits", "--seed", str(seed), "--out", str(out),
                          "--no-progress", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        records = read_metrics(out)
        single = default_run("simclr", seed)
        assert [r["epoch"] for r in records] == [r["epoch"] for r in single]
        assert records[0]["knn_top1"] == single[0]["knn_top1"]  # the same initialisation
        last["single"].append(single[-1]["knn_top1"])
        last["torchrun"].append(records[-1]["knn_top1"])
    mean = {name: sum(values) / len(values) for name, values in last.items()}
    assert abs(mean["torchrun"] - mean["single"]) <= 0.01, last
