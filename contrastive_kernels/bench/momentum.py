"""Momentum (EMA) update: momentum_update's backends against MoCo's per-parameter loop,
torch._foreach_lerp_ and torch._foreach_mul_ + torch._foreach_add_, on ResNet-50- and ViT-B-sized
parameter lists. Writes a CSV and a PNG to benchmarks/results/ and prints a table.

    python -m contrastive_kernels.bench.momentum                            # fp32, ResNet-50 and ViT-B/16 sets
    python -m contrastive_kernels.bench.momentum --quick                    # small sets, a smoke run
    python -m contrastive_kernels.bench.momentum --device cuda --online-dtype bfloat16   # fp32 EMA of bf16 weights

Every implementation is timed in interleaved rounds (one call each per round, median over
rounds), so load from other processes on the machine falls on all of them alike.
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from . import common

from contrastive_kernels import reference
from contrastive_kernels.ops.momentum import SUPPORTED_BACKENDS, momentum_update

MOMENTUM = 0.999


def resnet50_shapes(width=64, classes=1000):
    """torchvision resnet50's parameters in module order: 161 tensors, 25,557,032 values."""
    shapes = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2 ** stage
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:  # the downsample branch: 1x1 conv and its BatchNorm
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(classes, inplanes), (classes,)]


def vit_shapes(dim=768, depth=12, patch=16, tokens=197, classes=1000):
    """timm vit_base_patch16_224's parameters in module order: 152 tensors, 86,567,656 values."""
    shapes = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,), (classes, dim), (classes,)]


PARAMETER_SETS = {
    "resnet50": resnet50_shapes,
    "vit_b16": vit_shapes,
    # --quick: the same structure, narrower (161 tensors, 1.6M values; 152 tensors, 5.7M values).
    "resnet50-w16": functools.partial(resnet50_shapes, width=16),
    "vit_ti16": functools.partial(vit_shapes, dim=192),
}


def make_tensors(shapes, dtype, device, flat, seed):
    """One tensor per shape, allocated separately as a model's parameters are, or (flat=True)
    views of one buffer in order, the layout of flatten_parameters."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [torch.Size(s).numel() for s in shapes]
    if flat:
        values = torch.randn(sum(sizes), generator=gen).to(device, dtype)
        return [v.view(s) for v, s in zip(values.split(sizes), shapes)]
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def foreach_lerp(target, online, momentum):
    online = [o.to(t.dtype) for t, o in zip(target, online)]  # lerp needs one dtype (no-op if equal)
    torch._foreach_lerp_(target, online, 1.0 - momentum)


def foreach_mul_add(target, online, momentum):
    online = [o.to(t.dtype) for t, o in zip(target, online)]
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


def implementations(device):
    """name -> (update function, needs flat buffers), for every live implementation on `device`."""
    impls = {"moco-loop": (reference.momentum_update, False), "foreach_lerp": (foreach_lerp, False),
             "foreach_mul+add": (foreach_mul_add, False)}
    for backend, label in common.live_backends(SUPPORTED_BACKENDS, device).items():
        impls[f"fused-{label}"] = (functools.partial(momentum_update, backend=backend), backend == "triton")
    return impls


def interleaved_medians(calls, device, rounds, warmup=2):
    """name -> median seconds of calls[name](), one call of each per round."""
    times = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, call in calls.items():
            common.synchronize(device)
            start = time.perf_counter()
            call()
            common.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def inputs_for(set_name, dtype, online_dtype, device, flat):
    shapes = PARAMETER_SETS[set_name]()
    return (make_tensors(shapes, dtype, device, flat, seed=0), make_tensors(shapes, online_dtype, device, flat, seed=1))


def peak_memory_mb(impl, set_name, dtype, online_dtype, device):
    if device.type == "cuda":
        fn, flat = implementations(device)[impl]
        target, online = inputs_for(set_name, dtype, online_dtype, device, flat)
        fn(target, online, MOMENTUM)
        return common.cuda_peak_growth_mb(lambda: fn(target, online, MOMENTUM))
    names = [str(d).split(".")[-1] for d in (dtype, online_dtype)]
    return common.measure_in_fresh_process("contrastive_kernels.bench.momentum", [impl, set_name, *names])["peak_mb"]


def memory_probe(impl, set_name, dtype_name, online_dtype_name):
    """Fresh-process side of peak_memory_mb on CPU: prints {"peak_mb": ...}."""
    device = torch.device("cpu")
    fn, flat = implementations(device)[impl]
    target, online = inputs_for(set_name, getattr(torch, dtype_name), getattr(torch, online_dtype_name), device, flat)
    fn(target, online, MOMENTUM)  # warm-up: extension load, allocator
    print(common.json.dumps({"peak_mb": common.cpu_peak_growth_mb(lambda: fn(target, online, MOMENTUM))}))


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == set_name]
        colors = ["tab:gray" if not r["impl"].startswith("fused") else "tab:blue" for r in mine]
        bars = ax.barh([r["impl"] for r in mine], [r["median_ms"] for r in mine], color=colors)
        for bar, r in zip(bars, mine):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['gb_per_s']} GB/s",
                    va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median time per update (ms)")
        ax.set_title(f"{set_name}: {mine[0]['tensors']} tensors, {mine[0]['values'] / 1e6:.1f}M values", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    common.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", nargs="+", choices=list(PARAMETER_SETS), help="default: resnet50 vit_b16")
    parser.add_argument("--quick", action="store_true", help="the narrow sets (resnet50-w16, vit_ti16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                        help="the target's dtype")
    parser.add_argument("--online-dtype", choices=["float32", "float16", "bfloat16", "float64"],
                        help="the online tensors' dtype (default: the target's)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--measure-memory", nargs=4, metavar=("IMPL", "SET", "DTYPE", "ONLINE_DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        return memory_probe(*args.measure_memory)

    device = torch.device(args.device)
    dtype, online_dtype = getattr(torch, args.dtype), getattr(torch, args.online_dtype or args.dtype)
    sets = args.sets or (["resnet50-w16", "vit_ti16"] if args.quick else ["resnet50", "vit_b16"])
    meta = common.provenance(device)
    impls = implementations(device)
    rows = []
    for set_name in sets:
        shapes = PARAMETER_SETS[set_name]()
        values = sum(torch.Size(s).numel() for s in shapes)
        needed = {flat for _, flat in impls.values()}
        layouts = {flat: inputs_for(set_name, dtype, online_dtype, device, flat) for flat in needed}
        calls = {name: functools.partial(fn, *layouts[flat], MOMENTUM) for name, (fn, flat) in impls.items()}
        with torch.no_grad():
            medians = interleaved_medians(calls, device, args.rounds)
        # Read target and online, write target: the bytes any implementation must move.
        moved = values * (2 * dtype.itemsize + online_dtype.itemsize)
        for name in impls:
            peak = "" if args.no_memory else round(peak_memory_mb(name, set_name, dtype, online_dtype, device), 1)
            rows.append(dict(op="momentum_update", device=device.type, set=set_name, tensors=len(shapes), values=values,
                             impl=name, dtype=args.dtype, online_dtype=str(online_dtype).split(".")[-1],
                             median_ms=round(medians[name] * 1e3, 3),
                             gb_per_s=round(moved / medians[name] / 1e9, 1),
                             speedup_vs_moco=round(medians["moco-loop"] / medians[name], 2),
                             vs_foreach_lerp=round(medians["foreach_lerp"] / medians[name], 2), peak_mb=peak))

    online_tag = "" if online_dtype == dtype else f"-online-{args.online_dtype}"
    stem = f"momentum-{device.type}-{args.dtype}{online_tag}-{common.slug(meta['machine'])}-{meta['date']}"
    common.write_csv(args.out / f"{stem}.csv", rows, meta)
    plot(rows, args.out / f"{stem}.png", f"momentum_update (m={MOMENTUM}), target {args.dtype}, online "
         f"{rows[0]['online_dtype']}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
    print(common.format_table(rows, ["set", "impl", "median_ms", "gb_per_s", "speedup_vs_moco", "vs_foreach_lerp",
                                     "peak_mb"]))
    print(f"\n{meta}\nwrote {args.out / stem}.csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
