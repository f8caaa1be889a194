"""Packaging: the sdist and the wheel carry csrc/, and an installed (not editable) wheel passes
the tests from outside the source tree, its JIT build compiling the sources it ships.

`python -m build` (no --sdist/--wheel) builds the sdist from this checkout and then the wheel
from that sdist, so the wheel checked here also proves that the sdist is complete. The build
runs in build's isolated environment, as `pip install .` does: it installs the build-system
requirements of pyproject.toml (setuptools, wheel; no torch) from the package index or pip's
cache, which also tests that the default build needs nothing else.

The wheel is installed with `pip install --no-deps --target <tmp>/site`, not into this
environment: for the package that is the same install as a non-editable `pip install .`
(pip unpacks the same wheel, _csrc/ and the data included), but it leaves the environment's
editable install alone and reuses its torch rather than reinstalling it. The tests then run
with cwd=<tmp> and PYTHONPATH=<tmp>/site, from a copy of tests/, so the checkout is not
importable (checked), and with a fresh CK_EXTENSIONS_DIR, so the cpu extension really compiles,
from <tmp>/site/contrastive_kernels/_csrc (checked).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DATA = ["contrastive_kernels/trainers/data/digits.csv.gz",
        "contrastive_kernels/trainers/data/DIGITS_LICENSE.txt"]
# The non-slow tests of these modules: every CPU kernel (which needs the JIT build), the
# trainers (which need the shipped digits) and the bench suite's folder naming.
INNER_TESTS = ["test_ntxent.py", "test_infonce.py", "test_queue.py", "test_momentum.py",
               "test_trainer_data.py", "test_trainers.py", "test_bench_cli.py"]


def repo_csrc_files():
    """csrc/'s files relative to csrc/, without build leftovers (the filter of setup.py)."""
    root = REPO / "csrc"
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.is_file() and path.suffix not in {".o", ".so", ".pyc"}
                  and not any(part.startswith(".") or part == "__pycache__"
                              for part in path.relative_to(root).parts))


def clean_env(**overrides):
    """This environment without anything that points at the checkout or changes a build."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CK_", "PYTEST_")) and key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return {**env, **overrides}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(outdir), str(REPO)],
                           capture_output=True, text=True, env=clean_env(), timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels, sdists = sorted(outdir.glob("*.whl")), sorted(outdir.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in outdir.iterdir())
    return wheels[0], sdists[0]


def test_wheel_holds_csrc_and_data(dists):
    wheel, _ = dists
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # pure Python by default
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = repo_csrc_files()
    assert "ops.cpp" in expected
    shipped = sorted(name[len("contrastive_kernels/_csrc/"):] for name in names
                     if name.startswith("contrastive_kernels/_csrc/"))
    assert shipped == expected
    for name in DATA:
        assert name in names, name
    # Only the package and its metadata: no top-level csrc/ or tests/, no compiled library.
    stray = [name for name in names if not name.startswith(("contrastive_kernels/", "contrastive_kernels-"))
             or name.endswith((".so", ".pyc"))]
    assert not stray, stray


def test_sdist_holds_csrc_data_and_tests(dists):
    _, sdist = dists
    with tarfile.open(sdist) as archive:  # files only, without the top folder name-version/
        names = {member.name.split("/", 1)[1] for member in archive.getmembers()
                 if member.isfile() and "/" in member.name}
    assert sorted(name[len("csrc/"):] for name in names if name.startswith("csrc/")) == repo_csrc_files()
    for name in DATA + ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
                        "tests/conftest.py", "tests/helpers.py"]:
        assert name in names, name
    assert not any(name.startswith("contrastive_kernels/_csrc") for name in names)
    assert not any(name.endswith((".so", ".pyc")) for name in names)


def test_installed_wheel_passes_the_tests_outside_the_source_tree(dists, tmp_path):
    wheel, _ = dists
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                              "--disable-pip-version-check", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, env=clean_env(), timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (site / "contrastive_kernels" / "_csrc" / "ops.cpp").is_file()
    assert not (REPO / "contrastive_kernels" / "_csrc").exists(), "the build wrote into the checkout"

    # A copy of tests/ (conftest.py and helpers.py included) with the pytest settings (markers).
    shutil.copytree(REPO / "tests", tmp_path / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "test_packaging.py"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    ext = tmp_path / "ext"
    env = clean_env(PYTHONPATH=str(site), CK_EXTENSIONS_DIR=str(ext))

    where = subprocess.run([sys.executable, "-c", "import contrastive_kernels as ck, contrastive_kernels._build as b; "
                            "print(ck.__file__); print(b.csrc_dir())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, csrc = where.stdout.split()[-2:]
    assert Path(package_file).is_relative_to(site), package_file
    assert Path(csrc) == site / "contrastive_kernels" / "_csrc", csrc

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                            *[f"tests/{name}" for name in INNER_TESTS]],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=2400)
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary

    # The cpu extension was compiled into the fresh cache, from the shipped sources.
    built = list(ext.glob("*/contrastive_kernels_cpu/contrastive_kernels_cpu.so"))
    assert len(built) == 1, sorted(str(p) for p in ext.rglob("*"))
    ninja = (built[0].parent / "build.ninja").read_text()
    assert str(site / "contrastive_kernels" / "_csrc" / "ops.cpp") in ninja
    assert str(REPO / "csrc") not in ninja
