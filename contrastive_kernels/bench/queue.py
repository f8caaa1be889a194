"""KeyQueue.enqueue (every live backend) against MoCo's _dequeue_and_enqueue, which reads the
queue pointer back to the host every step. Writes a CSV and a PNG to benchmarks/results/ and
prints a table.

    python -m contrastive_kernels.bench.queue --device cpu      # K in {16384, 65536}, B=256, D=128
"""
import argparse
import sys
from pathlib import Path

import torch

from . import common

from contrastive_kernels import KeyQueue, reference
from contrastive_kernels.ops.queue import SUPPORTED_BACKENDS

POINTS = [(16384, 256, 128), (65536, 256, 128), (65536, 1024, 128)]  # (K, B, D)


def enqueuers(device, size, dim):
    """name -> enqueue(keys), each on its own queue."""
    moco = reference.MoCoQueue(size, dim, device=device)
    impls = {"moco": moco.dequeue_and_enqueue}
    for backend, label in common.live_backends(SUPPORTED_BACKENDS, device).items():
        impls[f"KeyQueue-{label}"] = KeyQueue(size, dim, device=device, backend=backend).enqueue
    return impls


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"K={r['k_queue']}\nB={r['batch']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        times = [r["median_us"] for r in rows if r["impl"] == impl]
        ax.bar([x + i * width for x in range(len(labels))], times, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("time per enqueue (us)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    common.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="one small queue (a smoke run)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    meta = common.provenance(device)
    rows = []
    for size, batch, dim in [(64, 8, 16)] if args.quick else POINTS:
        keys = torch.randn(batch, dim, device=device)
        point_rows = []
        for impl, enqueue in enqueuers(device, size, dim).items():
            seconds = common.median_seconds(lambda: enqueue(keys), device, args.repeats, warmup=3)
            moved = 2 * keys.nbytes  # read the keys, write them into the buffer
            point_rows.append(dict(op="queue", device=device.type, impl=impl, k_queue=size, batch=batch, d=dim,
                                   dtype="float32", median_us=round(seconds * 1e6, 1),
                                   gb_per_s=round(moved / seconds / 1e9, 2)))
        moco = next(r["median_us"] for r in point_rows if r["impl"] == "moco")
        for r in point_rows:
            r["speedup_vs_moco"] = round(moco / r["median_us"], 2)
        rows.extend(point_rows)
    stem = f"queue-{device.type}-float32-{common.slug(meta['machine'])}-{meta['date']}"
    common.write_csv(args.out / f"{stem}.csv", rows, meta)
    plot(rows, args.out / f"{stem}.png", f"enqueue, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
    print(common.format_table(rows, ["impl", "k_queue", "batch", "d", "median_us", "gb_per_s", "speedup_vs_moco"]))
    print(f"\n{meta}\nwrote {args.out / stem}.csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
