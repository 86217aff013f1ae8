"""GPU tier: torch.compile on CUDA. Each kernel compiled (inductor) equals eager, forward and every
gradient, and later steps reuse the first step's graphs (dynamo's error_on_recompile); the trainer's
`train.compile=true` runs on CUDA without a recompilation (test_gpu_train.py). Skipped without CUDA."""
import pytest
import torch

from gpu_helpers import GPU, rel_err
from test_gpu_kernels import KERNELS, _model, _run, case  # noqa: F401  (case: the shared fixture)

pytestmark = GPU


@pytest.mark.parametrize("kernel", ("reference", *KERNELS))
def test_compiled_equals_eager_without_recompiles_on_cuda(case, kernel):  # noqa: F811
    import torch._dynamo

    state, x, w, _ = case
    eager = _run(_model(kernel, torch.float32, state), x, w)
    torch._dynamo.reset()
    model = _model(kernel, torch.float32, state)
    compiled = torch.compile(model, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # later steps must reuse the first step's graphs
            got = _run(model, x, w, fn=compiled)
    bad = {k: rel_err(got[k], eager[k]) for k in eager if rel_err(got[k], eager[k]) > 1e-3}
    assert not bad, f"{kernel} compiled vs eager: {bad}"
