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
