"""The attention kernels under torch.compile: one graph per block (no graph break), no recompilation
on later steps, and compiled forward and gradients equal to eager, for every kernel.

The chunked engine of ``fused``/``sequential`` is a torch.library custom op (``swinv2::window_attention``
and its backward) with fake implementations and a registered autograd formula; ``opcheck`` holds
those registrations to the real op. ``aot_eager`` traces exactly what inductor would be given (fake
tensors, AOTAutograd's joint graph) in seconds; the inductor runs are in the slow suite.
"""
import pytest
import torch

from swinv2 import SwinTransformerV2, SwinV2Config
from swinv2.kernels import KERNELS
from swinv2.kernels.windowed import _sdpa_autograd
from swinv2.windows import RegionMask, shifted_window_regions, window_regions


def _block(kernel: str, padded: bool, attn_drop: float = 0.0, seed: int = 0):
    """A shifted (SW-MSA) block of a small model, with a region mask; `padded`: window 6 on an 8x8
    map, so the mask also cuts padded tokens off (pad_to_window)."""
    geometry = dict(window_size=6, pad_to_window=True) if padded else dict(window_size=4)
    cfg = SwinV2Config(img_size=32, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                       drop_path_rate=0.0, attn_drop_rate=attn_drop, num_classes=10, attention=kernel,
                       sequential_chunk=3, **geometry)
    torch.manual_seed(seed)
    block = SwinTransformerV2(cfg).layers[0].blocks[1]
    with torch.no_grad():  # the official init zeroes the post-norms: every attention gradient would be 0
        for name, p in block.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    assert block.attn_mask_regions is not None and (block.pad > 0) == padded
    return block


def _step(fn, block, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_close(a, b, rel, what):
    # relative to the whole tensor: gradients here span 1e-3..1e5, and reassociated sums differ
    # in the last bits of the large terms
    err = ((a - b).norm() / b.norm()).item()
    assert err <= rel, f"{what}: compiled vs eager relative error {err:.2e} > {rel:.0e}"


def _assert_compiled_matches_eager(kernel, padded, backend, rel):
    block = _block(kernel, padded)
    compiled = torch.compile(block, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation raises
        for _ in range(3):  # new values every step, the same shapes
            x = torch.randn(2, 64, 16, generator=g)
            out_c, dx_c, grads_c = _step(compiled, block, x)
            out_e, dx_e, grads_e = _step(block, block, x)
            _assert_close(out_c, out_e, rel, "output")
            _assert_close(dx_c, dx_e, rel, "input gradient")
            assert grads_c.keys() == grads_e.keys()
            for name in grads_e:
                _assert_close(grads_c[name], grads_e[name], rel, name)
    assert grads_e["attn.cpb_mlp.0.weight"].abs().sum() > 0  # the bias gradient reached the CPB MLP


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_block_compiles_to_one_graph_without_recompiles(kernel, padded):
    # 1e-5, not exact: the traced graph normalises q and k with the readable expression
    # (kernels/qk.py, _split_heads_cosine_traced), eager with the hand-written autograd function
    _assert_compiled_matches_eager(kernel, padded, "aot_eager", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_block_compiled_by_inductor_matches_eager(kernel):
    # inductor fuses the pointwise work around the products: equal up to float reassociation
    _assert_compiled_matches_eager(kernel, True, "inductor", 1e-5)


@pytest.mark.parametrize("kernel", ["fused", "sequential"])
def test_dropout_compiles_without_graph_break(kernel):
    # the dropout seed is drawn outside the op, where compile and checkpoint recomputation see it
    block = _block(kernel, padded=False, attn_drop=0.5).train()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    x = torch.randn(2, 64, 16, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _op_samples():
    """Arguments of swinv2::window_attention: no mask, a dense mask, region ids (padded too), dropout."""
    g = torch.Generator().manual_seed(0)
    n_img, nH, N, hd = 2, 2, 16, 4

    def qkvb(n_win):
        q, k, v = (torch.randn(n_img * n_win, nH, N, hd, generator=g, requires_grad=True) for _ in range(3))
        return q, k, v, (torch.rand(nH, N, N, generator=g) * 16).requires_grad_(True)

    shifted = shifted_window_regions(8, 8, 4, 2)
    padded = window_regions(6, 6, 4, 2, pad=2)
    seed = torch.tensor(1234)
    # (q, k, v, bias, mask, region, padded, seed, chunk_fwd, chunk_bwd, p)
    return [
        (*qkvb(4), None, False, False, None, 0, 0, 0.0),
        (*qkvb(4), RegionMask(shifted).dense(), False, False, None, 3, 3, 0.0),
        (*qkvb(4), shifted, True, False, None, 0, 0, 0.0),
        (*qkvb(4), padded, True, True, None, 2, 2, 0.0),
        (*qkvb(4), shifted, True, False, seed, 2, 2, 0.3),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_custom_op_registrations_agree_with_the_op(sample):
    # schema, fake (meta) implementation, autograd registration and AOT dispatch, dynamic shapes too
    args = _op_samples()[sample]
    torch.library.opcheck(torch.ops.swinv2.window_attention.default, args)


@pytest.mark.parametrize("mask_form", ["none", "regions", "padded"])
def test_off_cpu_fused_path_traces_to_one_graph(mask_form):
    # fused off CPU is plain SDPA under autograd (CUDA's memory-efficient kernel takes a bias that needs a
    # gradient); its tracing is device-independent, so it is checked here: no graph break, same values
    mask = {"none": None, "regions": RegionMask(shifted_window_regions(8, 8, 4, 2)),
            "padded": RegionMask(window_regions(6, 6, 4, 2, pad=2), padded=True)}[mask_form]
    q, k, v, bias, *_ = _op_samples()[0]
    compiled = torch.compile(_sdpa_autograd, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    out_c = compiled(q, k, v, bias, mask)
    out_e = _sdpa_autograd(q, k, v, bias, mask)
    torch.testing.assert_close(out_c, out_e)
    grads_c = torch.autograd.grad(out_c.square().sum(), (q, k, v, bias))
    grads_e = torch.autograd.grad(out_e.square().sum(), (q, k, v, bias))
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
