"""A bf16 model (the trainer's train.precision=bf16: weights AND buffers cast, bf16 input, no autocast)
computes what the float32 model does to bf16 precision, and its step stays in bf16: no float32 copy of an
activation (a float32 factor meeting a bf16 tensor would promote it, and on CPU a float32 island costs its
casts AND the float32 elementwise passes). Also: the pass-saving forms the bf16 work introduced
(split_heads_cosine, the token gather of the shifted windows, PatchMerging's one permuted copy) equal the
readable ones bit for bit. See docs/PERFORMANCE.md ("bf16 that pays")."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from swinv2 import SwinTransformerV2, SwinV2Config
from swinv2.attention import LOGIT_SCALE_MAX, WindowAttention
from swinv2.kernels import scaled_cosine_qk, split_heads
from swinv2.kernels.qk import _split_heads_cosine_traced, split_heads_cosine
from swinv2.kernels.reference import wide_dtype
from swinv2.model import DropPath, PatchMerging
from swinv2.windows import (cyclic_shift, reverse_cyclic_shift, shifted_window_partition, shifted_window_reverse,
                            window_partition, window_reverse)

from test_kernels import _randomise as _randomise_weights, _small_config as _config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomise(model, seed=0):
    # generic weights (see test_kernels); logit scales e^0.5..e^5, some at the clamp
    _randomise_weights(model, seed, max_log_scale=5.0)


def _models(kernel):
    torch.manual_seed(0)
    ref = SwinTransformerV2(SwinV2Config(**_config(attention=kernel)))
    _randomise(ref)
    low = SwinTransformerV2(SwinV2Config(**_config(attention=kernel)))
    low.load_state_dict(ref.state_dict())
    return ref, low.to(torch.bfloat16)


def _step(model, x):
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * w).sum().backward()
    return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_bf16_model_matches_float32_logits_and_gradients(kernel):
    ref, low = _models(kernel)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    r_out, r_grads = _step(ref, x)
    out, grads = _step(low, x.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 for p in low.parameters())
    # logits: bf16 keeps 8 significant bits; through 8 blocks the error stays ~1% of the logits
    assert _rel(out, r_out) < 0.02, _rel(out, r_out)
    torch.testing.assert_close(out, r_out, atol=0.05 * float(r_out.abs().max()), rtol=0.05)
    # gradients: the whole gradient (what the optimiser step sees) within 3%, the median parameter's
    # too, and every linear layer's weight gradient within 8%. Not asserted per parameter for the small
    # sums with cancellation (logit scales, q biases of the last stages, the CPB's): there bf16 alone
    # (before this work too) gives 20-300% relative error of a near-zero gradient.
    errs = {n: _rel(grads[n], g) for n, g in r_grads.items() if g.norm() > 0}
    flat, r_flat = (torch.cat([g[n].flatten() for n in errs]) for g in (grads, r_grads))
    assert _rel(flat, r_flat) < 0.03, _rel(flat, r_flat)
    assert sorted(errs.values())[len(errs) // 2] < 0.03
    linear = {n: e for n, e in errs.items() if n.endswith("weight") and r_grads[n].ndim >= 2 and "cpb_mlp" not in n}
    assert len(linear) > 30 and max(linear.values()) < 0.08, sorted(linear.items(), key=lambda kv: -kv[1])[:5]
    # the logit scale's gradient (a float32 path in the module) reaches the bf16 parameter
    assert all(grads[n].abs().max() > 0 for n in errs if n.endswith("logit_scale"))


class _DtypeRecorder(TorchDispatchMode):
    """Records (op, dtype, shape) of every tensor an op returns, and the ops that meet an
    activation-sized bf16 input with a float32 tensor (computed in float32 even when written to bf16:
    on CPU a mixed bf16 x float32 product is ~3x slower than the bf16 one)."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.outputs, self.mixed = big, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if (any(t.dtype == torch.bfloat16 and t.numel() > self.big for t in ins)
                and any(t.dtype == torch.float32 and t.ndim > 0 for t in ins)):
            self.mixed.append((str(func), [(t.dtype, tuple(t.shape)) for t in ins]))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, tuple(t.shape)))
        return out


def _float32_activations(model, x, autocast=False):
    """(float32 tensors returned by the ops of a fwd+bwd that are neither parameter-shaped (weights,
    their gradients) nor per-row statistics (last dim 1: norms, cosine factors; or at most one value
    per token and head: the fused kernel's log-sum-exp), ops mixing a bf16 activation with float32).
    The attention kernels' custom ops (swinv2::window_attention*) count by their outputs only."""
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    per_token_head = x.shape[0] * (x.shape[-1] // 4) ** 2 * 2  # B x stage-1 tokens x its 2 heads
    rec = _DtypeRecorder(per_token_head)
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().sum().backward()
    big = [(op, shape) for op, dt, shape in rec.outputs
           if dt == torch.float32 and shape not in param_shapes and (not shape or shape[-1] != 1)
           and math.prod(shape) > per_token_head]
    return big, [m for m in rec.mixed if not m[0].startswith("swinv2.")], {op for op, _, _ in rec.outputs}


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_bf16_step_makes_no_float32_copy_of_an_activation(kernel):
    # the weights-cast model: everything of activation size stays bf16; the logit scale and the cosine
    # factors are float32 but (nH, 1, 1) and per row. (The smallest activation here, stage 4's
    # (2, 4, 256), is above the per-token-head bound, so any float32 activation copy is caught.)
    _, low = _models(kernel)
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    big, mixed, ops = _float32_activations(low, x)
    assert big == [], big[:10]
    assert mixed == [], mixed[:10]
    # and the copies the step no longer makes: the shifted windows are one gather each way (no
    # torch.roll), PatchMerging one permuted copy (no four zero-filled slice gradients)
    assert "aten.roll.default" not in ops and "aten.slice_backward.default" not in ops
    assert "aten.index_select.default" in ops


def test_autocast_step_keeps_attention_activations_in_bf16():
    # torch.autocast (float32 weights): the cosine backward used to promote dq to float32 (a float32
    # scale times a bf16 gradient); every activation-sized tensor is bf16 now
    torch.manual_seed(0)
    model = SwinTransformerV2(SwinV2Config(**_config(attention="reference")))
    _randomise(model)
    big, _, _ = _float32_activations(model, torch.randn(2, 3, 64, 64), autocast=True)
    # autocast itself: float32 LayerNorm/GELU outputs are bf16 too on CPU, the casts of weights are
    # parameter-shaped; what is left must not be attention-shaped (B_, nH, N, hd)
    attn_shaped = [(op, s) for op, s in big if len(s) == 4 and s[-2] == 16]
    assert attn_shaped == [], attn_shaped[:10]


def test_logit_scale_clamp_is_exact_in_a_bf16_model():
    attn = WindowAttention(24, 4, 2).to(torch.bfloat16)
    with torch.no_grad():
        attn.logit_scale.fill_(5.0)  # above ln 100: clamped
    s = attn.logit_scale_value()
    assert s.dtype == torch.float32  # 100 to float32 precision, not the 98.9 of a clamp in bf16
    torch.testing.assert_close(s, torch.full((2, 1, 1), math.exp(LOGIT_SCALE_MAX)), atol=1e-4, rtol=0)
    with torch.no_grad():
        attn.logit_scale.fill_(math.log(10.0))
    # below the clamp: exp of the (bf16-rounded) parameter, the exp itself not rounded to bf16
    assert torch.equal(attn.logit_scale_value(), attn.logit_scale.detach().float().exp())
    x = torch.randn(8, 16, 24, dtype=torch.bfloat16, requires_grad=True)
    out = attn(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and attn.logit_scale.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# the pass-saving forms equal the readable ones
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("used", [(0, 1, 2), (0,), (1,), (2,), (0, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_heads_cosine_equals_split_heads_then_scaled_cosine_qk(used, dtype):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 7, 3 * 2 * 8, generator=g, dtype=dtype)
    five = qkv.view(6, 7, 3, 2, 8)
    five[0, :3, 0] *= 1e-14  # norms below eps: the clamp branch
    five[3, 1, :2] = 0.0
    qkv.requires_grad_(True)
    scale = (torch.rand(2, 1, 1, generator=g, dtype=dtype) * 20 + 0.5).requires_grad_(True)
    outs, grads = [], []
    for fused in (True, False):
        if fused:
            o = split_heads_cosine(qkv, 2, scale)
        else:
            q, k, v = split_heads(qkv, 2)
            o = (*scaled_cosine_qk(q, k, scale), v)
        ws = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, t in enumerate(o)]
        loss = sum((o[i] * ws[i]).sum() for i in used)
        outs.append(o)
        grads.append(torch.autograd.grad(loss, (qkv, scale), allow_unused=True))
    for a, b in zip(outs[0], outs[1]):
        assert a.is_contiguous() and torch.equal(a, b)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[0][0], grads[1][0], **tol)
    if 0 in used:
        torch.testing.assert_close(grads[0][1], grads[1][1], **tol)
    else:
        assert grads[0][1] is None or not grads[0][1].any()


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_compiled_form_of_split_heads_cosine_equals_the_autograd_function(dtype, rel):
    # what torch.compile traces (the readable expression, float32 inside) against the eager function
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, 7, 3 * 2 * 8, generator=g).to(dtype)
    qkv.view(6, 7, 3, 2, 8)[0, :3, :2] *= 1e-14  # norms below eps: the clamp branch, q and k
    scale = (torch.rand(2, 1, 1, generator=g) * 20 + 0.5).to(wide_dtype(qkv))
    ws = [torch.randn(6, 2, 7, 8, generator=g).to(dtype) for _ in range(3)]
    results = []
    for form in (split_heads_cosine, _split_heads_cosine_traced):
        x, s = qkv.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        outs = form(x, 2, s)
        sum((o.float() * w.float()).sum() for o, w in zip(outs, ws)).backward()
        assert all(o.dtype == dtype and o.is_contiguous() for o in outs)
        results.append((*outs, x.grad, s.grad))
    for mine, theirs in zip(*results):
        assert _rel(mine, theirs) <= rel


def test_split_heads_cosine_gradcheck():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 5, 3 * 2 * 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(2, 1, 1, generator=g, dtype=torch.float64) * 5 + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, s: split_heads_cosine(t, 2, s), (qkv, scale))


@pytest.mark.parametrize("H,W,ws,shift", [(8, 8, 4, 2), (8, 8, 4, 0), (12, 8, 4, 2), (12, 12, 6, 3)])
def test_shifted_window_gather_equals_roll_and_partition(H, W, ws, shift):
    x = torch.randn(2, H, W, 5, dtype=torch.float64, requires_grad=True)
    mine = shifted_window_partition(x, ws, shift)
    ref = window_partition(cyclic_shift(x, shift), ws).view(-1, ws * ws, 5)
    assert torch.equal(mine, ref)
    w = torch.randn(ref.shape, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad((mine * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x)[0])
    back = shifted_window_reverse(mine, ws, H, W, shift)
    assert torch.equal(back, reverse_cyclic_shift(window_reverse(ref.view(-1, ws, ws, 5), ws, H, W), shift))
    assert torch.equal(back, x)
    assert torch.autograd.gradcheck(lambda t: shifted_window_reverse(shifted_window_partition(t, ws, shift) * 2,
                                                                     ws, H, W, shift), (x,))


def test_patch_merging_equals_the_official_four_slices():
    B, H, C = 2, 6, 3
    pm = PatchMerging((H, H), C).double()
    x = torch.randn(B, H * H, C, dtype=torch.float64, requires_grad=True)
    x4 = x.view(B, H, H, C)
    official = pm.norm(pm.reduction(torch.cat([x4[:, 0::2, 0::2], x4[:, 1::2, 0::2], x4[:, 0::2, 1::2],
                                               x4[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)))
    mine = pm(x)
    assert torch.equal(mine, official)
    w = torch.randn(mine.shape, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad((mine * w).sum(), x)[0], torch.autograd.grad((official * w).sum(), x)[0])


def test_drop_path_keeps_the_expectation_and_drops_whole_samples():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 2)
    y = dp(x)
    kept = y[:, 0, 0] != 0
    assert torch.all((y == 0) | (y == 1 / 0.75)) and torch.all(y[kept] == 1 / 0.75) and torch.all(y[~kept] == 0)
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert torch.equal(dp.eval()(x), x)
