"""NT-Xent forward, backward and forward+backward: fused backends vs eager PyTorch and
torch.compile of the eager reference. Writes a CSV and a PNG to benchmarks/results/ and prints
a table.

    python benchmarks/bench_ntxent.py --device cpu            # 2N in {1024, 4096, 8192}, D in {128, 256}
    python benchmarks/bench_ntxent.py --device cuda --dtype bfloat16
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from contrastive_kernels import fused_ntxent, reference  # noqa: E402
from contrastive_kernels._backends import _auto_choice, unavailable_reason  # noqa: E402
from contrastive_kernels.ops.ntxent import SUPPORTED_BACKENDS  # noqa: E402

SIZES = {"cpu": [1024, 4096, 8192], "cuda": [1024, 4096, 16384, 65536]}
MODES = ("fwd", "bwd", "fwd+bwd")
TEMPERATURE = 0.5


def implementations(device):
    """name -> loss function, for every live implementation on `device`."""
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape
    impls = {"eager": reference.ntxent, "compile": torch.compile(reference.ntxent)}
    auto = _auto_choice(SUPPORTED_BACKENDS, device.type)
    for backend in SUPPORTED_BACKENDS:
        if unavailable_reason(backend, device) is None:
            name = f"fused-{backend}" + (" (auto)" if backend == auto else "")
            impls[name] = functools.partial(fused_ntxent, backend=backend)
    return impls


def make_inputs(n2, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(n2 * 1000 + d)
    z = torch.randn(n2, d, generator=gen).to(device, dtype)
    z_a, z_b = z[: n2 // 2].clone().requires_grad_(), z[n2 // 2:].clone().requires_grad_()
    return z_a, z_b


def fwd_bwd(loss_fn, z_a, z_b):
    loss = loss_fn(z_a, z_b, TEMPERATURE)
    torch.autograd.grad(loss, (z_a, z_b))


def time_modes(loss_fn, z_a, z_b, device, repeats):
    forward = lambda: loss_fn(z_a, z_b, TEMPERATURE)
    return {
        "fwd": common.median_seconds(forward, device, repeats),
        "bwd": common.median_seconds(lambda loss: torch.autograd.grad(loss, (z_a, z_b)), device, repeats,
                                     setup=forward),
        "fwd+bwd": common.median_seconds(lambda: fwd_bwd(loss_fn, z_a, z_b), device, repeats),
    }


def peak_memory_mb(impl, n2, d, dtype, device):
    if device.type == "cuda":
        loss_fn = implementations(device)[impl]
        z_a, z_b = make_inputs(n2, d, dtype, device)
        fwd_bwd(loss_fn, z_a, z_b)
        return common.cuda_peak_growth_mb(lambda: fwd_bwd(loss_fn, z_a, z_b))
    return common.measure_in_fresh_process(__file__, [impl, n2, d, str(dtype).split(".")[-1]])["peak_mb"]


def memory_probe(impl, n2, d, dtype_name):
    """Fresh-process side of peak_memory_mb on CPU: prints {"peak_mb": ...}."""
    device = torch.device("cpu")
    loss_fn = implementations(device)[impl]
    z_a, z_b = make_inputs(int(n2), int(d), getattr(torch, dtype_name), device)
    fwd_bwd(loss_fn, z_a, z_b)  # warm-up: extension load, compilation, allocator
    print(common.json.dumps({"peak_mb": common.cpu_peak_growth_mb(lambda: fwd_bwd(loss_fn, z_a, z_b))}))


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 4 * len(dims)), squeeze=False)
    for row_axes, d in zip(axes, dims):
        points = [r for r in rows if r["d"] == d and r["mode"] == "fwd+bwd"]
        for impl in dict.fromkeys(r["impl"] for r in points):
            mine = sorted((r for r in points if r["impl"] == impl), key=lambda r: r["n2"])
            style = dict(marker="o", linestyle="--" if impl in ("eager", "compile") else "-", label=impl)
            row_axes[0].plot([r["n2"] for r in mine], [r["median_ms"] for r in mine], **style)
            with_mem = [r for r in mine if r["peak_mb"] != ""]
            row_axes[1].plot([r["n2"] for r in with_mem], [max(r["peak_mb"], 0.1) for r in with_mem], **style)
        for ax, label in zip(row_axes, ("forward+backward time (ms)", "peak memory growth (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("2N (rows of z)")
            ax.set_ylabel(label)
            ax.set_title(f"D={d}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="values of 2N (default: by device)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--measure-memory", nargs=4, metavar=("IMPL", "N2", "D", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        return memory_probe(*args.measure_memory)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    meta = common.provenance(device)
    impls = implementations(device)
    rows = []
    from tqdm import tqdm

    points = [(n2, d) for d in args.dims for n2 in (args.sizes or SIZES[device.type])]
    for n2, d in tqdm(points, desc="ntxent", unit="shape"):
        z_a, z_b = make_inputs(n2, d, dtype, device)
        shape_rows = []
        for impl, loss_fn in impls.items():
            try:
                times = time_modes(loss_fn, z_a, z_b, device, args.repeats)
                peak = "" if args.no_memory else round(peak_memory_mb(impl, n2, d, dtype, device), 1)
            except torch.OutOfMemoryError:
                times, peak = {m: float("nan") for m in MODES}, "OOM"
            for mode in MODES:
                shape_rows.append(dict(op="ntxent", device=device.type, impl=impl, mode=mode, n2=n2, d=d,
                                       dtype=args.dtype, median_ms=round(times[mode] * 1e3, 3),
                                       peak_mb=peak if mode == "fwd+bwd" else ""))
        eager = {r["mode"]: r["median_ms"] for r in shape_rows if r["impl"] == "eager"}
        for r in shape_rows:
            r["speedup_vs_eager"] = round(eager[r["mode"]] / r["median_ms"], 2)
        rows.extend(shape_rows)

    stem = f"ntxent-{device.type}-{args.dtype}-{common.slug(meta['machine'])}-{meta['date']}"
    common.write_csv(args.out / f"{stem}.csv", rows, meta)
    plot(rows, args.out / f"{stem}.png",
         f"NT-Xent fwd+bwd, {args.dtype}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
    print(common.format_table(rows, ["impl", "mode", "n2", "d", "median_ms", "speedup_vs_eager", "peak_mb"]))
    print(f"\n{meta}\nwrote {args.out / stem}.csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
