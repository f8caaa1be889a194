"""NT-Xent with the negatives of W processes: fused_ntxent(..., group=WORLD) against
reference.ntxent_all_gather, the usual gather-with-gradient (OpenCLIP, lightly). Time per
forward+backward step and communication volume per rank, for W in {1, 2, 4} CPU processes on
Gloo. Writes a CSV and a PNG to benchmarks/results/ and prints a table.

    python -m contrastive_kernels.bench.distributed                     # W in {1, 2, 4}, N,D per rank in {512,128, 2048,128}
    python -m contrastive_kernels.bench.distributed --worlds 2 --points 1024,128 --no-memory
    python -m contrastive_kernels.bench.distributed --quick             # W in {1, 2, 4}, N,D = 64,32: a smoke run

Processes: each W spawns W processes on this machine (file:// rendezvous in a temporary folder,
Gloo), each with max(1, cores // W) threads; W=1 also goes through group=WORLD (a world of one),
so every row pays the same collectives' fixed costs. When W exceeds the cores the ranks
oversubscribe the CPU and take turns on it: the time per step then measures that too (the CSV's
`cores` and `threads_per_rank` and the plot's title say so).

Timing: in every rank, the median over `repeats` forward+backward steps (fp32, backend "auto":
the C++ cpu kernel for fused_ntxent), after one warm-up step, with a dist.barrier() before each
timed step; a row is the slowest rank's median (all_reduce MAX). `peak_mb` (unless --no-memory):
the largest growth over the ranks of a rank's peak RSS during one step, after malloc_trim(0)
handed freed memory back to the OS (common.cpu_peak_growth_mb).

Communication per rank and step (`volume`, from the shapes): the bytes of other ranks' data
that a rank receives, and of its own that it sends, over the wire. An all-gather of b bytes per
rank has every rank receive the W-1 other chunks and send (forward, in Gloo's ring) W-1 chunks:
(W-1)*b each way; an all_to_all of W chunks of c bytes keeps one and exchanges W-1: (W-1)*c each
way. (contrastive_kernels.distributed counts buffers instead: "2N*D elements sent, 2N*D*W
received" is the all-gather's input and output; the wire carries (W-1)*2N*D of each.)
  fused       handshake  all-gather of 5 float64:                        (W-1) * 40 bytes
              forward    all-gather of the 2N x D normalised rows:       (W-1) * 2N*D*4 bytes
              backward   all-gather of (lse, grad) per row, 4N float32:  (W-1) * 4N*4 bytes
  all_gather  forward    torch.distributed.nn.all_gather of the 2N x D rows: (W-1) * 2N*D*4 bytes
              backward   on Gloo an all_to_all (W scatters) of the W gathered rows' gradients,
                         2N x D each, then a sum:                        (W-1) * 2N*D*4 bytes
So the fused step moves (1 + 2/D) / 2 of the baseline's bytes, plus the 40-byte handshake.
"""
import argparse
import ctypes
import os
import sys
from pathlib import Path

import torch

from .._ranks import run_ranks
from . import common

METHODS = ("fused", "all_gather")
TEMPERATURE = 0.5
DEFAULT_POINTS = [(512, 128), (2048, 128)]  # (N, D) per rank: 2N rows of each rank's loss
QUICK_POINTS = [(64, 32)]
HANDSHAKE_FLOAT64 = 5  # distributed.agree: a local-error flag, N, D, dtype, temperature


def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def volume(method, world, n, dim, itemsize=4, accumulate_itemsize=4):
    """{"handshake", "forward", "backward"}: the bytes one rank sends, and receives, over the wire
    in one step (the module docstring says how they are counted; sent == received)."""
    others = world - 1
    rows = 2 * n
    forward = others * rows * dim * itemsize
    if method == "fused":
        return {"handshake": others * HANDSHAKE_FLOAT64 * 8, "forward": forward,
                "backward": others * 2 * rows * accumulate_itemsize}  # (lse, grad) per row: 4N floats
    if method == "all_gather":
        return {"handshake": 0, "forward": forward, "backward": others * rows * dim * itemsize}
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------
def _losses(group):
    from contrastive_kernels import fused_ntxent, reference

    return {"fused": lambda z_a, z_b: fused_ntxent(z_a, z_b, TEMPERATURE, group=group),
            "all_gather": lambda z_a, z_b: reference.ntxent_all_gather(z_a, z_b, TEMPERATURE, group=group)}


def _release_freed_memory():
    """Hands the heap's free pages back to the OS (glibc), so that a step re-using them shows in
    the peak RSS; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(rank, world, points, repeats, with_memory):
    """One rank (under _ranks.run_ranks): per point and method, [slowest rank's median seconds,
    largest peak growth in MB]."""
    import warnings

    import torch.distributed as dist

    # The baseline is the usual approach on purpose: not its deprecation notice, once per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
    group = dist.group.WORLD
    losses = _losses(group)
    results = []
    for n, dim in points:
        generator = torch.Generator().manual_seed(1000 * rank + n + dim)
        z = torch.randn(2 * n, dim, generator=generator)
        z_a, z_b = z[:n].clone().requires_grad_(), z[n:].clone().requires_grad_()
        for method in METHODS:
            loss_fn = losses[method]
            step = lambda: torch.autograd.grad(loss_fn(z_a, z_b), (z_a, z_b))
            seconds = common.median_seconds(lambda _: step(), "cpu", repeats, warmup=1, setup=dist.barrier)
            peak = float("nan")
            if with_memory:
                dist.barrier()
                _release_freed_memory()
                peak = common.cpu_peak_growth_mb(step)
            worst = torch.tensor([seconds, peak], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
            results.append(worst.tolist())
    return results


# ----------------------------------------------------------------------------------------
# All worlds: rows, CSV, plot
# ----------------------------------------------------------------------------------------
def run(worlds, points, repeats, with_memory, out_dir):
    from contrastive_kernels._backends import _auto_choice
    from contrastive_kernels.ops.ntxent import SUPPORTED_BACKENDS

    from tqdm import tqdm

    device = torch.device("cpu")
    meta = common.provenance(device)
    n_cores = cores()
    fused_backend = _auto_choice(tuple(SUPPORTED_BACKENDS), "cpu")  # builds the C++ kernel once, here
    rows = []
    for world in tqdm(worlds, desc="distributed", unit="world"):
        threads = max(1, n_cores // world)
        measured = iter(run_ranks(world, _measure, points, repeats, with_memory, threads=threads, timeout=1800)[0])
        for n, dim in points:
            point_rows = []
            for method in METHODS:
                seconds, peak = next(measured)
                moved = volume(method, world, n, dim)
                per_rank = sum(moved.values())
                point_rows.append(dict(
                    op="distributed", device="cpu", dist_backend="gloo", world=world, n_per_rank=n, dim=dim,
                    dtype="float32", method=method,
                    impl=f"fused-{fused_backend} (auto)" if method == "fused" else "gather-with-gradient",
                    cores=n_cores, threads_per_rank=threads, ms_per_step=round(seconds * 1e3, 3),
                    handshake_bytes=moved["handshake"], fwd_bytes=moved["forward"], bwd_bytes=moved["backward"],
                    bytes_sent_per_rank=per_rank, bytes_received_per_rank=per_rank,
                    peak_mb=round(peak, 1) if with_memory else ""))
            baseline = next(r for r in point_rows if r["method"] == "all_gather")
            for r in point_rows:
                r["speedup_vs_all_gather"] = round(baseline["ms_per_step"] / r["ms_per_step"], 2)
                r["bytes_vs_all_gather"] = (round(r["bytes_sent_per_rank"] / baseline["bytes_sent_per_rank"], 4)
                                            if baseline["bytes_sent_per_rank"] else "")
            rows.extend(point_rows)

    stem = f"distributed-cpu-float32-{common.slug(meta['machine'])}-{meta['date']}"
    common.write_csv(out_dir / f"{stem}.csv", rows, meta)
    oversubscribed = [w for w in worlds if w > n_cores]
    note = (f"{n_cores} cores: W={','.join(map(str, oversubscribed))} oversubscribes them" if oversubscribed
            else f"{n_cores} cores, {n_cores}//W threads per rank")
    plot(rows, out_dir / f"{stem}.png",
         f"NT-Xent over W Gloo processes, fwd+bwd, float32, {meta['machine']}, torch {meta['torch']}, "
         f"commit {meta['commit']}\n{note}")
    print(common.format_table(rows, ["world", "n_per_rank", "dim", "method", "threads_per_rank", "ms_per_step",
                                     "speedup_vs_all_gather", "bytes_sent_per_rank", "bytes_vs_all_gather",
                                     "peak_mb"]))
    print(f"\n{note}\n{meta}\nwrote {out_dir / stem}.csv and .png")
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_memory = any(isinstance(r["peak_mb"], float) for r in rows)
    fig, axes = plt.subplots(1, 3 if with_memory else 2, figsize=(16 if with_memory else 11, 4.5))
    worlds = sorted({r["world"] for r in rows})
    points = list(dict.fromkeys((r["n_per_rank"], r["dim"]) for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [("ms_per_step", "time per fwd+bwd step (ms, slowest rank)", 1),
              ("bytes_sent_per_rank", "communication per rank and step (MB sent = received)", 2**-20)]
    if with_memory:
        panels.append(("peak_mb", "peak memory growth per rank (MB)", 1))
    for ax, (key, label, scale) in zip(axes, panels):
        for (n, dim), color in zip(points, colors * len(points)):
            for method in METHODS:
                mine = sorted((r for r in rows if (r["n_per_rank"], r["dim"]) == (n, dim) and r["method"] == method),
                              key=lambda r: r["world"])
                ax.plot([r["world"] for r in mine], [r[key] * scale for r in mine], color=color, marker="o",
                        linestyle="-" if method == "fused" else "--",
                        label=f"{'fused_ntxent' if method == 'fused' else 'all_gather (baseline)'}, N={n}, D={dim}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("W (processes)")
        ax.set_ylabel(label)
        if key == "ms_per_step":
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


def parse_points(values):
    return [tuple(int(v) for v in p.split(",")) for p in values]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (Gloo); on cuda this benchmark is skipped")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts W (default: 1,2,4)")
    parser.add_argument("--points", type=str, nargs="+",
                        help="problem sizes per rank as N,D (default: 512,128 2048,128; --quick: 64,32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N,D = 64,32 and 3 repeats (a smoke run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cpu":
        print(f"distributed: skipped on {args.device}: this benchmark runs CPU processes on Gloo "
              "(python -m contrastive_kernels.bench.distributed --device cpu)")
        return 0
    worlds = sorted({int(w) for w in args.worlds.split(",") if w.strip()})
    if not worlds or min(worlds) < 1:
        parser.error(f"--worlds must be positive integers, got {args.worlds!r}")
    points = parse_points(args.points) if args.points else (QUICK_POINTS if args.quick else DEFAULT_POINTS)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    run(worlds, points, repeats, not args.no_memory, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
