import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be
# switched on before triton is first imported (by contrastive_kernels, below).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contrastive_kernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """default_run(method, seed=0): the metrics records of the README's command with its defaults
    (`train --method <method>`, seed 0 unless given), run once per session for every test that
    compares with it."""
    from helpers import read_metrics, run_cli

    runs = {}

    def records(method, seed=0):
        if (method, seed) not in runs:
            out = tmp_path_factory.mktemp(f"default-{method}-seed{seed}") / "run"
            result = run_cli("--method", method, "--seed", str(seed), "--out", str(out), "--no-progress",
                             cwd=out.parent)
            assert result.returncode == 0, result.stderr
            runs[method, seed] = read_metrics(out)
        return runs[method, seed]

    return records
