"""Locate or build the native extensions in csrc/ (the `cpu` and `cuda` backends).

As in DeepSpeed's op_builder: a module built ahead of time (`CK_BUILD_EXT=1 pip install
--no-build-isolation -e .`) wins; otherwise csrc/ is compiled just in time with ninja into a
cache folder of this environment; otherwise the backend is unavailable, with one warning that
says why. Nothing here runs at import or test collection: the first op call that needs a
native backend calls `load`.

Two extensions, so that a CUDA toolchain problem never costs the CPU kernels:
  cpu   csrc/ops.cpp (every op's schema) + csrc/cpu/*.cpp
  cuda  csrc/cuda/*.cu, loaded after `cpu` (whose schemas it implements)
"""
import fcntl
import functools
import glob
import logging
import hashlib
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200


def csrc_dir():
    """csrc/ of a source checkout, or the copy an installed package carries as _csrc/."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def sources(kind, root):
    if kind == "cpu":
        return [str(root / "ops.cpp")] + sorted(glob.glob(str(root / "cpu" / "*.cpp")))
    return sorted(glob.glob(str(root / "cuda" / "*.cu")))


def cpu_flags():
    # -march=native: the JIT build runs on the machine that runs the kernels (CK_CPU_ARCH
    # overrides, e.g. x86-64-v3 for a wheel meant for other machines). -fopenmp makes
    # at::parallel_for, which is inlined into this extension, actually run in parallel.
    arch = os.environ.get("CK_CPU_ARCH", "native")
    return ["-O3", f"-march={arch}", "-fopenmp"]


def cuda_flags():
    return ["-O3", "-lineinfo"]


def ensure_cuda_home():
    """CUDA_HOME for nvcc: the environment's, else /usr/local/cuda when it exists."""
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    home = os.environ.get("CUDA_HOME")
    return home if home and Path(home, "bin", "nvcc").exists() else None


def cache_dir():
    """One folder per Python environment and torch build, so two venvs never share objects."""
    base = os.environ.get("CK_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "contrastive_kernels")
    env_id = hashlib.sha1(f"{sys.prefix}|{torch.__version__}|{torch.version.cuda}".encode())
    tag = f"{sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag}-{env_id.hexdigest()[:10]}"
    return Path(base) / tag


def _out_of_date(library, srcs):
    if not library.exists():
        return True
    headers = glob.glob(str(Path(srcs[0]).parent / "**" / "*.h"), recursive=True)
    return max(os.path.getmtime(path) for path in srcs + headers) > library.stat().st_mtime


def _jit_build(kind, root):
    ensure_cuda_home()  # before cpp_extension reads CUDA_HOME at import
    # On GPU-less machines its import logs "No CUDA runtime is found", which is expected here.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    name = f"contrastive_kernels_{kind}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's build lock is a plain file that a killed build leaves behind, and the next build
    # then waits on it forever. Our flock dies with its process: whoever holds it is the only
    # builder, so a torch lock file found while holding it is stale and can go.
    with open(build_dir / "ck-build.flock", "w") as flock:
        fcntl.flock(flock, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            stale.unlink()
        srcs = sources(kind, root)
        if _out_of_date(build_dir / f"{name}.so", srcs):
            print(f"contrastive_kernels: compiling the {kind} extension with ninja into {build_dir} "
                  "(first use in this environment; about a minute)", file=sys.stderr, flush=True)
        kwargs = dict(name=name, sources=srcs, build_directory=str(build_dir),
                      extra_cflags=cpu_flags(), extra_ldflags=["-fopenmp"], is_python_module=False,
                      verbose=os.environ.get("CK_VERBOSE_BUILD") == "1")
        if kind == "cuda":
            kwargs.update(extra_cflags=["-O3"], extra_cuda_cflags=cuda_flags(),
                          extra_ldflags=[], with_cuda=True)
        cpp_extension.load(**kwargs)


def _prebuilt(kind):
    """The library `CK_BUILD_EXT=1 pip install` put next to this file, if any."""
    found = sorted(PACKAGE_DIR.glob(f"_C_{kind}*.so"))
    if not found:
        return False
    torch.ops.load_library(str(found[0]))
    return True


def _why_not_buildable(kind):
    root = csrc_dir()
    if root is None:
        return "the csrc/ sources are not present in this installation"
    if not sources(kind, root):
        return f"csrc/{kind}/ has no sources"
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch is a CPU-only build"
        if ensure_cuda_home() is None:
            return "nvcc was not found (set CUDA_HOME)"
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    try:
        import ninja  # noqa: F401  (cpp_extension needs the ninja build tool)
    except ImportError:
        return "ninja is not installed (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def load(kind):
    """Load the `kind` ("cpu" or "cuda") extension; None on success, else the reason it failed.

    The first failure warns once; the result is cached for the life of the process.
    """
    if kind == "cuda":
        reason = load("cpu")
        if reason is not None:
            return f"the cpu extension, which holds the op schemas, failed: {reason}"
    if _prebuilt(kind):
        return None
    reason = _why_not_buildable(kind)
    if reason is None:
        try:
            _jit_build(kind, csrc_dir())
        except Exception as error:  # compiler errors arrive as RuntimeError/CalledProcessError
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # Prefer the compiler's own "error:" line over the wrapper's summary.
            errors = ([line for line in lines if "error:" in line]
                      or [line for line in lines if "error" in line.lower()] or lines[-2:])
            reason = (f"the build failed: {errors[0]} (CK_VERBOSE_BUILD=1 shows the whole log)")
    if reason is not None:
        warnings.warn(f"contrastive_kernels: the '{kind}' backend is unavailable ({reason}); "
                      "backend='auto' uses the next backend instead. "
                      "`python -m contrastive_kernels env` shows every backend.", stacklevel=2)
    return reason
