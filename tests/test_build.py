"""The native build: never at import, one warning and a fallback on failure, no hang on a
stale lock, the CUDA sources compiled wherever nvcc and a CUDA torch exist, and `env`."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from contrastive_kernels import _build

pytestmark = pytest.mark.slow


def run_python(code, env_overrides, timeout=900, cwd=None):
    env = {**os.environ, **env_overrides}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def test_import_and_auto_resolution_do_not_build_until_an_op_runs(tmp_path):
    out = run_python("""
        import contrastive_kernels, contrastive_kernels.nn, os, sys
        from contrastive_kernels import _build
        assert not _build.cache_dir().exists(), "import created the build cache"
        print("ok")
    """, {"CK_EXTENSIONS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "compiling" not in out.stderr


def test_failed_build_warns_once_and_auto_falls_back_to_torch(tmp_path):
    # -march=no-such-cpu makes the compiler fail the way a broken toolchain would.
    out = run_python("""
        import warnings, torch
        from contrastive_kernels import fused_ntxent, reference
        z_a, z_b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = fused_ntxent(z_a, z_b)
            second = fused_ntxent(z_a, z_b)
        messages = [str(w.message) for w in caught if "contrastive_kernels" in str(w.message)]
        assert len(messages) == 1, messages
        assert "'cpu' backend is unavailable" in messages[0] and "build failed" in messages[0], messages[0]
        expected = reference.ntxent(z_a, z_b)
        assert torch.allclose(first, expected, rtol=1e-10) and torch.equal(first, second)
        try:
            fused_ntxent(z_a, z_b, backend="cpu")
        except ValueError as error:
            assert "backend='cpu' is not available" in str(error), error
        else:
            raise AssertionError("backend='cpu' did not raise")
        print("ok")
    """, {"CK_EXTENSIONS_DIR": str(tmp_path), "CK_CPU_ARCH": "no-such-cpu"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_stale_build_lock_does_not_hang(tmp_path):
    env = {"CK_EXTENSIONS_DIR": str(tmp_path)}
    old = os.environ.get("CK_EXTENSIONS_DIR")
    os.environ["CK_EXTENSIONS_DIR"] = str(tmp_path)
    try:
        build_dir = _build.cache_dir() / "contrastive_kernels_cpu"
    finally:
        if old is None:
            del os.environ["CK_EXTENSIONS_DIR"]
        else:
            os.environ["CK_EXTENSIONS_DIR"] = old
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # what a build killed mid-way leaves behind
    out = run_python("""
        import torch
        from contrastive_kernels import _build, fused_ntxent, reference
        assert _build.load("cpu") is None, _build.load("cpu")
        z_a, z_b = torch.randn(300, 9, dtype=torch.float64), torch.randn(300, 9, dtype=torch.float64)
        assert torch.allclose(fused_ntxent(z_a, z_b, backend="cpu"), reference.ntxent(z_a, z_b), rtol=1e-10)
        print("built")
    """, env, timeout=600)
    assert out.returncode == 0 and "built" in out.stdout, out.stderr


def nvcc_missing_reason():
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if _build.ensure_cuda_home() is None:
        return "no nvcc (CUDA_HOME)"
    return None


@pytest.mark.skipif(nvcc_missing_reason() is not None, reason=str(nvcc_missing_reason()))
def test_cuda_sources_compile_and_register():
    # Runs here without a GPU: nvcc builds csrc/cuda for sm_80 and sm_90, the library loads,
    # and its kernels are registered for the CUDA dispatch key.
    out = run_python("""
        import torch
        from contrastive_kernels import _build
        reason = _build.load("cuda")
        assert reason is None, reason
        for op in ("ntxent_fwd", "ntxent_bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"contrastive_kernels::{op}", "CUDA"), op
        print("compiled")
    """, {}, timeout=1500)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stdout + out.stderr


def test_env_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "contrastive_kernels", "env"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    for expected in ("torch", "triton", "nvcc", "fused_ntxent", "cpu     live", "torch   live",
                     "cuda    unavailable"):
        assert expected in out.stdout, f"{expected!r} missing from:\n{out.stdout}"




def test_ahead_of_time_build_is_used_instead_of_jit(tmp_path):
    # CK_BUILD_EXT=1 builds csrc/ with setuptools (the CUDA sources too where nvcc and a CUDA torch
    # exist); the package then loads those libraries and never touches the JIT cache.
    repo = Path(__file__).resolve().parent.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, tmp_path / name)
    for name in ("csrc", "contrastive_kernels"):
        shutil.copytree(repo / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "CK_BUILD_EXT": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    expect_cuda = nvcc_missing_reason() is None
    assert (tmp_path / "contrastive_kernels" / "_C_cpu.so").exists()
    assert (tmp_path / "contrastive_kernels" / "_C_cuda.so").exists() == expect_cuda
    out = run_python(f"""
        import torch
        import contrastive_kernels
        from contrastive_kernels import _build, fused_ntxent, reference
        assert contrastive_kernels.__file__.startswith({str(tmp_path)!r}), contrastive_kernels.__file__
        assert _build.load("cpu") is None
        assert (_build.load("cuda") is None) == {expect_cuda}
        z = torch.randn(40, 6, dtype=torch.float64)
        assert torch.allclose(fused_ntxent(z, z.flip(0), backend="cpu"), reference.ntxent(z, z.flip(0)), rtol=1e-10)
        assert not _build.cache_dir().exists(), "the JIT cache was used"
        print("prebuilt")
    """, {"CK_EXTENSIONS_DIR": str(tmp_path / "jit-cache")}, cwd=tmp_path)  # cwd: import the copy
    assert out.returncode == 0 and "prebuilt" in out.stdout, out.stderr
