"""GPU tier: the three attention kernels on CUDA. `fused` and `sequential` against `reference`, the
forward and every gradient (the input's, every weight's, the CPB MLP's included), in fp32 and in bf16
(the model cast to bf16, as DeepSpeed's bf16 mode runs it); `fused` through SDPA's memory-efficient
kernel with the bias gradient; the apex paths where apex
imports (compile: test_gpu_compile.py). Skipped, with the reason, without CUDA."""
import pytest
import torch

from gpu_helpers import GPU, rel_err
from swinv2 import SwinTransformerV2, SwinV2Config
from test_kernels import _randomise, _small_config

pytestmark = GPU
KERNELS = ("fused", "sequential")
CPB = ("layers.0.blocks.1.attn.cpb_mlp.0.weight", "layers.0.blocks.1.attn.cpb_mlp.2.weight")


def _model(kernel: str, dtype: torch.dtype, state=None, **kw):
    cfg = SwinV2Config(**_small_config(sequential_chunk=5, **kw), attention=kernel)
    torch.manual_seed(0)
    m = SwinTransformerV2(cfg)
    if state is None:
        _randomise(m)
    else:
        m.load_state_dict(state)
    return m.to("cuda", dtype)


def _run(model, x: torch.Tensor, w: torch.Tensor, fn=None):
    """Output, input gradient and every parameter gradient of sum(fn(x) * w) (fn: the model, or a
    compiled model), in float64."""
    x = x.to(next(model.parameters()).dtype).clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = (model if fn is None else fn)(x)
    (out.double() * w).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    return {"logits": out.double(), "input grad": x.grad.double(), **grads}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """fp32 means fp32 here: cuDNN's TF32 convolutions (on by default) would round the patch embedding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def case():
    """The reference kernel in float64 on the GPU (the truth), its weights, input and output weights."""
    ref = _model("reference", torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g).cuda()
    w = torch.randn(2, 10, generator=g).double().cuda()
    truth = _run(ref, x, w)
    for key in CPB:  # the gradients compared are real, not zeros
        assert truth[key].abs().max() > 1e-4, key
    return {k: v.cpu() for k, v in ref.state_dict().items()}, x, w, truth


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference_fp32(case, kernel):
    state, x, w, truth = case
    got = _run(_model(kernel, torch.float32, state), x, w)
    assert got.keys() == truth.keys()
    bad = {k: rel_err(got[k], truth[k]) for k in truth if rel_err(got[k], truth[k]) > 1e-4}
    assert not bad, f"{kernel} fp32 vs reference: {bad}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference_bf16(case, kernel, report):
    """bf16 rounding is large: against the float64 truth, each kernel's error stays near the bf16
    reference kernel's own error e: logits and input gradient within 2e + 0.01, each weight's gradient
    within 4e + 0.05 where bf16 resolves it (e <= 0.1; the others, sums of few cancelling terms
    such as a 2x2-window stage's logit_scale, are reported, not held)."""
    state, x, w, truth = case
    ref = _run(_model("reference", torch.bfloat16, state), x, w)
    got = _run(_model(kernel, torch.bfloat16, state), x, w)
    bad, noisy = {}, []
    for k in truth:
        e, e_ref = rel_err(got[k], truth[k]), rel_err(ref[k], truth[k])
        if k in ("logits", "input grad"):
            ok = e <= 2 * e_ref + 1e-2
        elif e_ref > 0.1:
            ok, _ = True, noisy.append(f"{k} {e:.3f} (reference {e_ref:.3f})")
        else:
            ok = e <= 4 * e_ref + 0.05
        if not ok:
            bad[k] = (round(e, 4), round(e_ref, 4))
    report(f"{kernel} bf16 on {torch.cuda.get_device_name()}: {len(noisy)} gradients unresolved by bf16: "
           + "; ".join(noisy))
    assert not bad, f"{kernel} bf16 (error, reference kernel's error): {bad}"


def test_fused_runs_sdpa_memory_efficient_kernel_with_bias_gradient(case, monkeypatch):
    """On CUDA `fused` is one SDPA call per block whose float mask (bias + shift mask) requires grad;
    only the memory-efficient backend allowed, so the call fails if it cannot take that mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    state, x, w, truth = case
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.dtype, attn_mask is not None and attn_mask.requires_grad))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        got = _run(_model("fused", torch.float32, state), x, w)
    assert len(calls) == 8 and all(grad for _, grad in calls), calls  # one per block (depths 2,2,2,2), bias differentiable
    for key in CPB:
        assert rel_err(got[key], truth[key]) < 1e-4, key


def test_apex_fused_layernorm_and_adam_match_torch(case):
    apex = pytest.importorskip("apex", reason="apex is not importable here (optim.fused=auto uses torch's AdamW)")
    del apex
    from swinv2_train.parallelize import swap_fused_layernorm
    from apex.optimizers import FusedAdam

    state, x, w, _ = case
    plain, fused = _model("fused", torch.float32, state), _model("fused", torch.float32, state)
    assert swap_fused_layernorm(fused) > 0 and fused.state_dict().keys() == plain.state_dict().keys()
    opts = [torch.optim.AdamW(plain.parameters(), lr=1e-3),
            FusedAdam(fused.parameters(), lr=1e-3, adam_w_mode=True)]
    for _ in range(3):
        for m, opt in zip((plain, fused), opts):
            opt.zero_grad(set_to_none=True)
            _run(m, x, w)
            opt.step()
    for (n, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert rel_err(b, a) < 1e-4, n
