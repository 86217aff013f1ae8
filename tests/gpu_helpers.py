"""The GPU tier's shared parts (`python -m pytest -m gpu`; scripts/gpu_check.sh runs it on a lent GPU).

Every test of the tier carries `pytestmark = GPU`: the `gpu` marker, and a visible skip where torch
sees no CUDA device, so the default test command stays green on CPU machines."""
import pytest
import torch

NO_CUDA = ("needs a CUDA GPU: torch.cuda.is_available() is False here; on a GPU machine run "
           "`python -m pytest -m gpu` or scripts/gpu_check.sh OUT_DIR")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of `a` against `b`, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
