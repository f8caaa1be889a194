"""The runner shared by the loss benchmarks (NT-Xent, InfoNCE): forward, backward and
forward+backward of every implementation at every problem size, peak memory, CSV, PNG, table.

A loss benchmark script supplies:
  op            name used in file names ("ntxent")
  implementations(device) -> {name: loss_fn(*inputs)}; "eager" is the baseline
  make_inputs(point, dtype, device) -> tuple of tensors; the ones requiring grad get gradients
  point_keys    names of the fields of a point, e.g. ("n2", "d"); the first is the plot's x axis
  panel_key     the point field that gets its own row of plots
  matmul_flops(point, mode) -> the matmul work of the eager loss, the yardstick of every row's TFLOP/s
"""
import argparse
import functools
import json
from pathlib import Path

import torch

from . import common

MODES = ("fwd", "bwd", "fwd+bwd")


def _differentiable(inputs):
    return [t for t in inputs if t.requires_grad]


def forward_backward(loss_fn, inputs):
    torch.autograd.grad(loss_fn(*inputs), _differentiable(inputs))


def time_modes(loss_fn, inputs, device, repeats):
    forward = lambda: loss_fn(*inputs)
    return {
        "fwd": common.median_seconds(forward, device, repeats),
        "bwd": common.median_seconds(lambda loss: torch.autograd.grad(loss, _differentiable(inputs)), device,
                                     repeats, setup=forward),
        "fwd+bwd": common.median_seconds(lambda: forward_backward(loss_fn, inputs), device, repeats),
    }


class LossBenchmark:
    def __init__(self, op, module, implementations, make_inputs, point_keys, panel_key, default_points,
                 matmul_flops):
        self.op, self.module, self.implementations = op, module, implementations
        self.matmul_flops = matmul_flops
        self.make_inputs, self.point_keys, self.panel_key = make_inputs, point_keys, panel_key
        self.default_points = default_points  # device type -> list of points

    def peak_memory_mb(self, impl, point, dtype, device):
        if device.type == "cuda":
            loss_fn = self.implementations(device)[impl]
            inputs = self.make_inputs(point, dtype, device)
            forward_backward(loss_fn, inputs)
            return common.cuda_peak_growth_mb(lambda: forward_backward(loss_fn, inputs))
        args = [impl, str(dtype).split(".")[-1], *point]
        return common.measure_in_fresh_process(self.module, args)["peak_mb"]

    def memory_probe(self, impl, dtype_name, *point):
        """The fresh-process side of peak_memory_mb on CPU: prints {"peak_mb": ...}."""
        device = torch.device("cpu")
        loss_fn = self.implementations(device)[impl]
        inputs = self.make_inputs(tuple(int(v) for v in point), getattr(torch, dtype_name), device)
        forward_backward(loss_fn, inputs)  # warm-up: extension load, compilation, allocator
        print(json.dumps({"peak_mb": common.cpu_peak_growth_mb(lambda: forward_backward(loss_fn, inputs))}))

    def run(self, device, dtype_name, points, repeats, with_memory, out_dir):
        from tqdm import tqdm

        device, dtype = torch.device(device), getattr(torch, dtype_name)
        meta = common.provenance(device)
        impls = self.implementations(device)
        rows = []
        for point in tqdm(points, desc=self.op, unit="size"):
            inputs = self.make_inputs(point, dtype, device)
            point_rows = []
            for impl, loss_fn in impls.items():
                try:
                    times = time_modes(loss_fn, inputs, device, repeats)
                    peak = round(self.peak_memory_mb(impl, point, dtype, device), 1) if with_memory else ""
                except torch.OutOfMemoryError:
                    times, peak = {mode: float("nan") for mode in MODES}, "OOM"
                for mode in MODES:
                    point_rows.append(dict(op=self.op, device=device.type, impl=impl, mode=mode,
                                           **dict(zip(self.point_keys, point)), dtype=dtype_name,
                                           median_ms=round(times[mode] * 1e3, 3),
                                           tflops=round(self.matmul_flops(point, mode) / times[mode] / 1e12, 3),
                                           peak_mb=peak if mode == "fwd+bwd" else ""))
            eager = {r["mode"]: r["median_ms"] for r in point_rows if r["impl"] == "eager"}
            for r in point_rows:
                r["speedup_vs_eager"] = round(eager[r["mode"]] / r["median_ms"], 2)
            rows.extend(point_rows)

        stem = f"{self.op}-{device.type}-{dtype_name}-{common.slug(meta['machine'])}-{meta['date']}"
        common.write_csv(out_dir / f"{stem}.csv", rows, meta)
        self.plot(rows, out_dir / f"{stem}.png",
                  f"{self.op} fwd+bwd, {dtype_name}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
        columns = ["impl", "mode", *self.point_keys, "median_ms", "speedup_vs_eager", "tflops", "peak_mb"]
        print(common.format_table(rows, columns))
        print(f"\n{meta}\nwrote {out_dir / stem}.csv and .png")
        return rows

    def plot(self, rows, path, title):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x_key = self.point_keys[0] if self.point_keys[0] != self.panel_key else self.point_keys[1]
        panels = sorted({r[self.panel_key] for r in rows})
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
        for row_axes, panel in zip(axes, panels):
            points = [r for r in rows if r[self.panel_key] == panel and r["mode"] == "fwd+bwd"]
            for impl in dict.fromkeys(r["impl"] for r in points):
                mine = sorted((r for r in points if r["impl"] == impl), key=lambda r: r[x_key])
                style = dict(marker="o", linestyle="--" if impl in ("eager", "compile") else "-", label=impl)
                row_axes[0].plot([r[x_key] for r in mine], [r["median_ms"] for r in mine], **style)
                with_mem = [r for r in mine if isinstance(r["peak_mb"], float)]
                row_axes[1].plot([r[x_key] for r in with_mem], [max(r["peak_mb"], 0.1) for r in with_mem], **style)
            for ax, label in zip(row_axes, ("forward+backward time (ms)", "peak memory growth (MB)")):
                if not any(len(line.get_xdata()) for line in ax.lines):  # --no-memory
                    ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
                    continue
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(x_key)
                ax.set_ylabel(label)
                ax.set_title(f"{self.panel_key}={panel}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        common.save_figure(fig, path)

    def main(self, argv=None, description=""):
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--points", type=str, nargs="+",
                            help=f"problem sizes as {','.join(self.point_keys)} (default: by device)")
        parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        parser.add_argument("--repeats", type=int, default=5)
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
        parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
        parser.add_argument("--measure-memory", nargs="+", help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        if args.measure_memory:
            return self.memory_probe(*args.measure_memory)
        device = torch.device(args.device)
        points = ([tuple(int(v) for v in p.split(",")) for p in args.points] if args.points
                  else self.default_points[device.type])
        self.run(device, args.dtype, points, args.repeats, not args.no_memory, args.out)
        return 0


def live_fused_backends(fused_fn, supported, device):
    """{"fused-<backend>[ (auto)]": fused_fn with that backend} for every live backend."""
    return {f"fused-{label}": functools.partial(fused_fn, backend=backend)
            for backend, label in common.live_backends(supported, device).items()}
