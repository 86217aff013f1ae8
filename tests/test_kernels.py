"""The three attention kernels compute the same function (forward and every gradient), and the
sequential kernel's memory is bounded by its chunk, not by the number of windows."""
import math

import pytest
import torch
from swinv2_tools.live_memory import SeeThroughMode

from swinv2 import SwinTransformerV2, SwinV2Config
from swinv2.attention import WindowAttention
from swinv2.kernels import (fused_attention, reference_attention as _reference, scaled_cosine_qk,
                            sequential_attention as _sequential, split_heads)
from swinv2.windows import shifted_window_mask

TOL = 1e-5


# The kernels take q already scaled (the module folds the per-head scale in); the tests below keep a
# per-head scale input so its gradient is compared too.
def reference_attention(q, k, v, scale, bias, mask, **kw):
    return _reference(q * scale, k, v, bias, mask, **kw)


def sequential_attention(q, k, v, scale, bias, mask, **kw):
    return _sequential(q * scale, k, v, bias, mask, **kw)


def _small_config(**kw):
    # 64px, window 4: stage 1 (16x16) and 2 (8x8) have shifted windows with masks; 3 and 4 are clipped.
    base = dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=4,
                drop_path_rate=0.0, num_classes=10)
    base.update(kw)
    return base


@torch.no_grad()
def _randomise(model, seed=0, max_log_scale=4.0):
    # The official init zeroes the res-post norms, which would make every attention gradient zero
    # and the comparison vacuous; give every parameter a generic value instead.
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "logit_scale" in name:  # scales e^0.5..e^max (from 4.6 = ln 100 on, some hit the clamp)
            p.copy_(torch.rand(p.shape, generator=g) * (max_log_scale - 0.5) + 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif p.ndim == 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _run(model, x, seed=1):
    x = x.clone().requires_grad_(True)
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn_type", ["cosine", "dot"])
@pytest.mark.parametrize("pretrained", [(0, 0, 0, 0), (3, 3, 3, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_kernels_agree_on_full_model(attn_type, pretrained, padded):
    # chunk 5 divides neither 16 windows x 2 images (stage 1) nor 4 x 2 (stage 2). Padded: window 6
    # pads stage 1 (16 -> 18, 9 windows) and stage 2 (8 -> 12, 4 windows), shifted and unshifted blocks.
    extra = dict(window_size=6, pad_to_window=True) if padded else {}
    cfg = _small_config(attn_type=attn_type, pretrained_window_sizes=pretrained, sequential_chunk=5, **extra)
    torch.manual_seed(0)
    ref = SwinTransformerV2(SwinV2Config(**cfg, attention="reference"))
    _randomise(ref)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    r_out, r_dx, r_grads = _run(ref, x)
    assert ref.layers[0].blocks[1].attn_mask is not None and ref.layers[1].blocks[1].attn_mask is not None
    if padded:
        assert [blk.pad for blk in ref.layers[0].blocks] == [2, 2] and ref.layers[1].blocks[0].pad == 4
    # the gradients we compare are real, not zeros
    for key in ("layers.0.blocks.1.attn.cpb_mlp.0.weight", "layers.0.blocks.1.attn.cpb_mlp.2.weight",
                "layers.1.blocks.1.attn.qkv.weight"):
        assert r_grads[key].abs().max() > 1e-4, key
    if attn_type == "cosine":
        assert r_grads["layers.0.blocks.1.attn.logit_scale"].abs().max() > 1e-5
    for kernel in ("fused", "sequential"):
        m = SwinTransformerV2(SwinV2Config(**cfg, attention=kernel))
        m.load_state_dict(ref.state_dict())
        out, dx, grads = _run(m, x)
        torch.testing.assert_close(out, r_out, atol=TOL, rtol=TOL, msg=f"{kernel} logits")
        torch.testing.assert_close(dx, r_dx, atol=TOL, rtol=TOL, msg=f"{kernel} input grad")
        assert grads.keys() == r_grads.keys()
        for name in r_grads:
            torch.testing.assert_close(grads[name], r_grads[name], atol=TOL, rtol=TOL,
                                       msg=lambda m, n=name: f"{kernel} grad {n}: {m}")


def _attention_inputs(n_img, n_win, n_heads=3, n_tok=16, hd=8, seed=0, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    B_ = n_img * n_win
    q, k, v = (torch.randn(B_, n_heads, n_tok, hd, generator=g, dtype=torch.float64) for _ in range(3))
    scale = (torch.rand(n_heads, 1, 1, generator=g, dtype=torch.float64) * 5 + 1)
    bias = torch.rand(n_heads, n_tok, n_tok, generator=g, dtype=torch.float64) * 16
    mask = None
    if with_mask:
        mask = torch.where(torch.rand(n_win, n_tok, n_tok, generator=g) < 0.3, -100.0, 0.0).double()
    return q, k, v, scale, bias, mask


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("n_img", [1, 2])  # one image: gradients are written in place; two: gathered
def test_sequential_function_gradcheck_against_reference(chunk, with_mask, n_img):
    # float64 so the only difference allowed is rounding: every input's gradient, incl. the bias
    # (summed over all windows and chunks) and the per-head scale.
    q, k, v, scale, bias, mask = _attention_inputs(n_img, 6, with_mask=with_mask)
    _assert_sequential_matches_reference((q, k, v, scale, bias), mask, chunk)


def _assert_sequential_matches_reference(inputs, mask, chunk):
    """float64 sequential vs reference: the output and every input's gradient, to rounding."""
    ins = [t.clone().requires_grad_(True) for t in inputs]
    ins2 = [t.clone().requires_grad_(True) for t in inputs]
    out_r = reference_attention(*ins, mask)
    out_s = sequential_attention(*ins2, mask, chunk=chunk)
    torch.testing.assert_close(out_s, out_r, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(out_r)
    grads_r = torch.autograd.grad((out_r * w).sum(), ins)
    grads_s = torch.autograd.grad((out_s * w).sum(), ins2)
    for name, a, b in zip("q k v scale bias".split(), grads_s, grads_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("mask_form", ["none", "dense", "regions", "padded", "padded_dense", "padded_unshifted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: the flash op + saved log-sum-exp
def test_fused_function_matches_reference(mask_form, dtype):
    from swinv2.windows import RegionMask, shifted_window_regions, window_regions

    g = torch.Generator().manual_seed(3)
    n_img, n_heads, ws = 2, 3, 4
    mask = None
    if mask_form in ("dense", "regions"):  # a real shift mask of a 12x12 map: 9 windows, 5 of them masked
        regions = shifted_window_regions(12, 12, ws, ws // 2)
        mask = RegionMask(regions) if mask_form == "regions" else RegionMask(regions).dense(dtype)
    elif mask_form.startswith("padded"):  # a 10x10 map padded to 12x12 (-inf between pad and real tokens)
        regions = window_regions(10, 10, ws, 0 if mask_form == "padded_unshifted" else ws // 2, pad=2)
        mask = RegionMask(regions, padded=True)
        assert mask.dense().isinf().any()
        if mask_form == "padded_dense":
            mask = mask.dense(dtype)
    n_win, n_tok = 9, ws * ws
    q, k, v = (torch.randn(n_img * n_win, n_heads, n_tok, 8, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.rand(n_heads, n_tok, n_tok, generator=g, dtype=dtype) * 16
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    ins2 = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out_r, out_f = _reference(*ins, mask), fused_attention(*ins2, mask)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_f, out_r, **tol)
    w = torch.randn(out_r.shape, generator=g, dtype=dtype)
    grads_r = torch.autograd.grad((out_r * w).sum(), ins)
    for name, a, b in zip("q k v bias".split(), torch.autograd.grad((out_f * w).sum(), ins2), grads_r):
        torch.testing.assert_close(a, b, **tol, msg=name)
    # fused's off-CPU path (plain SDPA under autograd) is the same function; on CPU it takes SDPA's math path
    from swinv2.kernels.windowed import _sdpa_autograd

    ins3 = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out_s = _sdpa_autograd(*ins3, mask)
    torch.testing.assert_close(out_s, out_r, **tol)
    for name, a, b in zip("q k v bias".split(), torch.autograd.grad((out_s * w).sum(), ins3), grads_r):
        torch.testing.assert_close(a, b, **tol, msg=f"sdpa {name}")


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_sequential_matches_reference_under_padding(chunk, shift):
    from swinv2.windows import RegionMask, window_regions

    q, k, v, scale, bias, _ = _attention_inputs(2, 9, with_mask=False)
    mask = RegionMask(window_regions(10, 10, 4, shift, pad=2), padded=True)
    _assert_sequential_matches_reference((q, k, v, scale, bias), mask, chunk)


@pytest.mark.parametrize("kernel", ["reference", "fused", "sequential"])
def test_kernels_ignore_padded_keys_and_values(kernel):
    """Real queries' outputs do not depend on what the padded tokens hold (any k, any v)."""
    from swinv2.kernels import KERNELS
    from swinv2.windows import PAD_REGION, RegionMask, window_regions

    regions = window_regions(10, 10, 4, 2, pad=2)
    mask = RegionMask(regions, padded=True)
    q, k, v, _, bias, _ = (t.float() if torch.is_tensor(t) else t for t in _attention_inputs(2, 9, with_mask=False))
    is_pad = (regions == PAD_REGION).repeat(2, 1)[:, None, :, None]  # (B_, 1, N, 1), windows of 2 images
    g = torch.Generator().manual_seed(7)
    k2 = torch.where(is_pad, torch.randn(k.shape, generator=g) * 100, k)
    v2 = torch.where(is_pad, torch.randn(v.shape, generator=g) * 1e4, v)
    out, out2 = (KERNELS[kernel](q, kk, vv, bias, mask, 0.0, 4) for kk, vv in ((k, v), (k2, v2)))
    real = ~is_pad.expand_as(out)
    assert torch.equal(out[real], out2[real])
    assert not torch.equal(out, out2)  # the pad rows themselves did change: the check is not vacuous


def test_sequential_gradcheck_small():
    q, k, v, scale, bias, mask = _attention_inputs(1, 3, n_heads=2, n_tok=4, hd=3)
    ins = tuple(t.requires_grad_(True) for t in (q, k, v, scale, bias))
    assert torch.autograd.gradcheck(lambda *a: sequential_attention(*a, mask, chunk=2), ins)


def _cosine_qk_autograd(q, k, scale):
    # the readable two-line form: F.normalize and a multiply, differentiated by autograd
    return torch.nn.functional.normalize(q, dim=-1) * scale, torch.nn.functional.normalize(k, dim=-1)


def test_scaled_cosine_qk_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = (torch.rand(2, 1, 1, generator=g, dtype=torch.float64) * 5 + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(scaled_cosine_qk, (q, k, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_cosine_qk_matches_autograd_incl_zero_rows(dtype):
    # strided q/k views of one qkv tensor, as in the model; some rows with a norm below eps (clamped:
    # no projection term there) and some exactly zero, so the clamp branch of the backward is compared too
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 7, 3, 2, 8, generator=g, dtype=dtype)
    qkv[0, :3, 0] *= 1e-14
    qkv[2, 4, 1] *= 1e-14
    qkv[3, 1, :2] = 0.0
    qkv.requires_grad_(True)
    scale = (torch.rand(2, 1, 1, generator=g, dtype=dtype) * 20 + 0.5).requires_grad_(True)
    outs, grads = [], []
    for fn in (scaled_cosine_qk, _cosine_qk_autograd):
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        qn, kn = fn(q, k, scale)
        outs.append((qn, kn))
        w1, w2 = (torch.randn(qn.shape, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in (2, 3))
        grads.append(torch.autograd.grad((qn * w1).sum() + (kn * w2).sum(), (qkv, scale)))
    assert outs[0][0].is_contiguous() and outs[0][1].is_contiguous()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        torch.testing.assert_close(a, b, **tol)
    assert grads[0][0][0, :3, 0].abs().max() > 1e3  # clamped rows: gradient g * s / eps, huge but finite


@pytest.mark.parametrize("used", [(0, 1, 2), (2,), (0, 2)])
def test_split_heads_matches_view_permute_unbind(used):
    # outputs and the qkv gradient equal the readable view/permute/unbind, also when some of q, k, v
    # get no gradient at all (their slot of the qkv gradient must be zero, not uninitialised)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 9, 3 * 12, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(5, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mine = split_heads(qkv, 3)
    ref = qkv.view(5, 9, 3, 3, 4).permute(2, 0, 3, 1, 4).unbind(0)
    for a, b in zip(mine, ref):
        assert a.is_contiguous() and torch.equal(a, b)
    grads = [torch.autograd.grad(sum((outs[i] * ws[i]).sum() for i in used), qkv)[0] for outs in (mine, ref)]
    assert torch.equal(grads[0], grads[1])
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 3), (qkv,))


def test_sequential_dropout_backward_matches_its_forward():
    # With attention dropout the sequential kernel must replay the same dropout mask in backward.
    # Check its gradient against finite differences of its own (seeded) forward via gradcheck on
    # a function that re-seeds the global RNG each call.
    q, k, v, scale, bias, mask = _attention_inputs(1, 3, n_heads=1, n_tok=4, hd=2)
    ins = tuple(t.requires_grad_(True) for t in (q, k, v, scale, bias))

    def f(*a):
        torch.manual_seed(123)
        return sequential_attention(*a, mask, attn_drop=0.3, chunk=2)

    out1, out2 = f(*ins), f(*ins)
    assert torch.equal(out1, out2)
    assert torch.autograd.gradcheck(f, ins)


class _LargestScores(SeeThroughMode):
    """Largest tensor produced (forward or backward) whose last two dims are (N, N): scores,
    probabilities, their gradients, bias+mask slices."""

    def __init__(self, n_tok):
        super().__init__()
        self.n_tok, self.largest = n_tok, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self.call(func, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim >= 3 and tuple(t.shape[-2:]) == (self.n_tok, self.n_tok):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_scores(kernel, res, chunk=3, ws=4, dim=24, heads=2):
    torch.manual_seed(0)
    attn = WindowAttention(dim, ws, heads, kernel=kernel, sequential_chunk=chunk)
    mask = shifted_window_mask(res, res, ws, ws // 2)
    x = torch.randn(mask.shape[0], ws * ws, dim, requires_grad=True)  # dim != N so x never matches
    with _LargestScores(ws * ws) as probe:
        attn(x, mask).sum().backward()
    assert x.grad is not None and attn.cpb_mlp[0].weight.grad is not None
    return probe.largest, mask.shape[0]


def test_sequential_memory_bounded_by_chunk_not_windows():
    chunk, heads, n_tok = 3, 2, 16
    seq_small, nw_small = _largest_scores("sequential", 16, chunk)
    seq_big, nw_big = _largest_scores("sequential", 32, chunk)
    assert nw_big == 4 * nw_small == 64
    assert seq_small == seq_big <= chunk * heads * n_tok * n_tok
    # the materialised kernel grows with the window count: this is what the test can detect
    ref_small, _ = _largest_scores("reference", 16)
    ref_big, _ = _largest_scores("reference", 32)
    assert ref_big == 4 * ref_small == nw_big * heads * n_tok * n_tok


def test_bias_computed_once_per_forward():
    calls = []
    attn = WindowAttention(24, 4, 2, kernel="sequential", sequential_chunk=2)
    attn.cpb_mlp.register_forward_hook(lambda *a: calls.append(1))
    mask = shifted_window_mask(16, 16, 4, 2)
    attn(torch.randn(32, 16, 24), mask).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("kernel", ["reference", "fused", "sequential"])
def test_kernels_run_a_bf16_model_with_shifted_windows(kernel):
    # a model cast to bf16 (DeepSpeed's bf16 mode, scripts/memory_model.py): every kernel runs forward and
    # backward with the shift masks, keeps bf16, and agrees with the float32 model to bf16 precision
    torch.manual_seed(0)
    model = SwinTransformerV2(SwinV2Config(**_small_config(attention=kernel)))
    _randomise(model)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x).detach()
    model = model.to(torch.bfloat16)
    out = model(x.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)


def test_unknown_kernel_lists_valid_ones():
    with pytest.raises(ValueError, match="reference, fused, sequential"):
        WindowAttention(24, 4, 2, kernel="flash")
    with pytest.raises(ValueError, match=r"attention.*'flash'.*reference, fused, sequential"):
        SwinV2Config(attention="flash")


def test_fused_matches_reference_in_eval_no_grad():
    # inference path: bias does not require grad, so CPU SDPA may use its fast kernel
    cfg = _small_config(sequential_chunk=3)
    ref = SwinTransformerV2(SwinV2Config(**cfg, attention="reference")).eval()
    _randomise(ref, seed=5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        r = ref(x)
        for kernel in ("fused", "sequential"):
            m = SwinTransformerV2(SwinV2Config(**cfg, attention=kernel)).eval()
            m.load_state_dict(ref.state_dict())
            torch.testing.assert_close(m(x), r, atol=TOL, rtol=TOL)


def test_logit_scale_clamped_at_ln100():
    q, k, v, _, bias, mask = _attention_inputs(1, 2, n_heads=2, with_mask=False)
    attn = WindowAttention(24, 4, 2)
    with torch.no_grad():
        attn.logit_scale.fill_(math.log(1000.0))
    assert torch.allclose(attn.logit_scale_value(), torch.full((2, 1, 1), 100.0))
