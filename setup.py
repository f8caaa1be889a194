"""contrastive_kernels: a plain Python install by default.

The C++/CUDA sources in csrc/ are compiled just in time with ninja on first use. A source
checkout (and an editable install) compiles csrc/ in place; a wheel carries a copy of it as
contrastive_kernels/_csrc/, which is where _build.csrc_dir() looks in an installed package. The
sdist carries csrc/ at its top level (MANIFEST.in), so a wheel built from it gets the copy too.

To build the extensions ahead of time instead (needs torch installed, hence no build isolation):

    CK_BUILD_EXT=1 pip install --no-build-isolation -e .
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC_JUNK_SUFFIXES = {".o", ".so", ".pyc"}  # build leftovers; never shipped (see MANIFEST.in)


def csrc_files():
    """Every file of csrc/ (sources and headers), relative to csrc/, sorted."""
    root = ROOT / "csrc"
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.is_file() and path.suffix not in CSRC_JUNK_SUFFIXES
                  and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts))


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/ into the built package as contrastive_kernels/_csrc/.

    Only into the build folder (hence the wheel): the source tree never gets a second copy, and an
    editable install skips it, since there _build.csrc_dir() finds csrc/ next to the package.
    """

    def _csrc_targets(self):
        target = Path(self.build_lib) / "contrastive_kernels" / "_csrc"
        return [(ROOT / "csrc" / name, target / name) for name in csrc_files()]

    def run(self):
        super().run()
        if self.editable_mode:
            return
        if not (ROOT / "csrc" / "ops.cpp").is_file():
            raise FileNotFoundError(f"{ROOT / 'csrc'} is missing: the wheel would ship without its sources")
        for source, target in self._csrc_targets():
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(target) for _, target in self._csrc_targets()]


def native_extensions():
    """The two extensions of contrastive_kernels/_build.py, built by setuptools instead."""
    spec = importlib.util.spec_from_file_location("ck_build", ROOT / "contrastive_kernels" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # only _build.py: the package itself would import triton
    build.ensure_cuda_home()  # before cpp_extension reads CUDA_HOME at import
    from torch.utils import cpp_extension
    csrc = ROOT / "csrc"
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # setuptools wants relative paths
    extensions = [cpp_extension.CppExtension(
        "contrastive_kernels._C_cpu", rel(build.sources("cpu", csrc)),
        extra_compile_args={"cxx": build.cpu_flags()}, extra_link_args=["-fopenmp"])]
    if build.sources("cuda", csrc) and build._why_not_buildable("cuda") is None:
        extensions.append(cpp_extension.CUDAExtension(
            "contrastive_kernels._C_cuda", rel(build.sources("cuda", csrc)),
            extra_compile_args={"cxx": ["-O3"], "nvcc": build.cuda_flags()}))
    return extensions, {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions() if os.environ.get("CK_BUILD_EXT") == "1" else ([], {})
cmdclass = {**cmdclass, "build_py": BuildPyWithCsrc}

setup(
    name="contrastive_kernels",
    version="0.1.0",
    description="Fused GPU and CPU kernels for contrastive self-supervised learning (SimCLR, MoCo)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["contrastive_kernels", "contrastive_kernels.*"]),
    package_data={"contrastive_kernels.trainers": ["data/digits.csv.gz", "data/DIGITS_LICENSE.txt"]},
    python_requires=">=3.10",
    # torch 2.4 brought torch.library.custom_op; its CUDA wheels bring a matching triton.
    # matplotlib draws the trainers' curves and the benchmark plots; Pillow decodes `folder:` images.
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm", "matplotlib", "pillow"],
    # build: tests/test_packaging.py builds the sdist and wheel with `python -m build`.
    extras_require={"test": ["pytest", "hypothesis", "build"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
