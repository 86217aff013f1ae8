"""The module's two projection steps as autograd functions with hand-written backward passes.

Readable equivalents (tests/test_kernels.py holds them equal, values and gradients):
``split_heads``      = qkv.view(B_, N, 3, nH, hd).permute(2, 0, 3, 1, 4).unbind(0)
``scaled_cosine_qk`` = (F.normalize(q, dim=-1) * s, F.normalize(k, dim=-1))
``split_heads_cosine`` = the two fused: (s * normalize(q), normalize(k), v) straight from qkv
The custom backwards save a pass over the tensors each (measured on CPU, see docs/PERFORMANCE.md).

Low precision (a bf16 model): the big elementwise products run in the tensors' own dtype (a float32
factor would promote them to a float32 copy); only the per-row factors (norms, s / |q|, the row dots'
projection coefficients) and the scale's gradient are formed in float32. On CPU every bf16 elementwise
op costs about what its float32 twin does (they compute in float32 lanes), so in a bf16 step these
passes are a bigger share than in float32 (``split_heads_cosine`` makes fewer and cheaper ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import wide_dtype


def _head_views(qkv: torch.Tensor, num_heads: int):
    """(B_, N, 3*C) -> q, k, v as strided (B_, nH, N, hd) views of the projection's output."""
    B_, N, C3 = qkv.shape
    return qkv.view(B_, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class _SplitHeads(torch.autograd.Function):
    """qkv (B_, N, 3*C) -> q, k, v (B_, nH, N, hd), each a contiguous copy.

    The kernels want contiguous per-head tensors. Autograd of view/permute/unbind would stack the
    three gradients and then copy the stack back into the projection's layout (two passes over 3C
    per token); this backward writes each gradient into its slot of one (B_, N, 3, nH, hd) tensor.
    Copies also mean no output keeps the whole qkv tensor alive.
    """

    @staticmethod
    def forward(ctx, qkv, num_heads: int):
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in _head_views(qkv, num_heads))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv):
        like = next(g for g in (dq, dk, dv) if g is not None)
        B_, nH, N, hd = like.shape
        dqkv = torch.empty(B_, N, 3, nH, hd, dtype=like.dtype, device=like.device)
        for i, g in enumerate((dq, dk, dv)):
            if g is None:
                dqkv[:, :, i].zero_()
            else:
                dqkv[:, :, i].copy_(g.transpose(1, 2))
        return dqkv.view(B_, N, 3 * nH * hd), None


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B_, N, 3*C) -> q, k, v (B_, num_heads, N, C/num_heads), contiguous (see _SplitHeads)."""
    return _SplitHeads.apply(qkv, num_heads)


NORM_EPS = 1e-12  # F.normalize's


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)


class _ScaledCosineQK(torch.autograd.Function):
    """(s * q / max(|q|, eps), k / max(|k|, eps)) over the last dim, written contiguous.

    The same values as F.normalize (q's factor s / max(|q|, eps) as one division, k divided by its
    clamped norm), but the backward is one projection per tensor,
    dx = (g - x_hat (x_hat . g)) * s / max(|x|, eps) (no projection where the norm was clamped),
    instead of autograd's chain of norm/div/mul backwards (~1 s of a 1536^2 step). Only the clamped
    norms are saved: the outputs are saved by the attention kernel anyway.
    """

    @staticmethod
    def forward(ctx, q, k, scale):
        nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
        nk = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
        qn = torch.mul(q, scale / nq, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        kn = torch.div(k, nk, out=torch.empty(k.shape, dtype=k.dtype, device=k.device))
        ctx.save_for_backward(qn, kn, nq, nk, scale)
        return qn, kn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dqn, dkn):
        qn, kn, nq, nk, scale = ctx.saved_tensors
        dq = dk = ds = None
        if dqn is not None:
            r = _row_dot(qn, dqn)  # s * (q_hat . g) per row
            if ctx.needs_input_grad[0]:
                # qn = s q_hat: dq = (s g - qn (qn . g) / s) / |q|
                proj = torch.where(nq > NORM_EPS, r / (scale * nq), 0.0)
                dq = (dqn * (scale / nq)).addcmul_(qn, proj, value=-1)
            if ctx.needs_input_grad[2]:  # d s = sum over rows of q_hat . g = r / s
                ds = (r.sum(dim=tuple(i for i in range(r.ndim) if i != r.ndim - 3), keepdim=True)
                      .view(-1, 1, 1) / scale).view(scale.shape)
        if dkn is not None and ctx.needs_input_grad[1]:
            proj = torch.where(nk > NORM_EPS, _row_dot(kn, dkn) / nk, 0.0)
            dk = (dkn / nk).addcmul_(kn, proj, value=-1)
        return dq, dk, ds


def scaled_cosine_qk(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor):
    """q (..., nH, N, hd), k alike, scale (nH, 1, 1) -> (s * normalize(q), normalize(k)), contiguous."""
    return _ScaledCosineQK.apply(q, k, scale)


def _cosine_factors(x: torch.Tensor, scale):
    """(clamped row norms in x's dtype, per-row multiplier s / |x| in x's dtype) of x (..., hd).

    The norm comes from the input-dtype kernel (it accumulates in float32 and rounds once; asking for
    a float32 result is 2x slower on CPU in bf16); the quotient s / |x| is formed in float32 and
    rounded once, so |output| = s to one bf16 rounding."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
    if scale is None:
        return n, None
    return n, (scale.to(wide_dtype(x)) / n.to(wide_dtype(x))).to(x.dtype)


def _row_dot_fast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row dot over the last dim, (..., 1): the product summed by a matrix-vector product, which on
    CPU is ~2x faster than a last-dim sum of 32 elements in bf16 (same float32 accumulation)."""
    hd = a.shape[-1]
    return (a * b).reshape(-1, hd).matmul(a.new_ones(hd, 1)).view(*a.shape[:-1], 1)


class _SplitHeadsCosine(torch.autograd.Function):
    """qkv (B_, N, 3*C) -> (s * normalize(q), normalize(k), v), each (B_, nH, N, hd) contiguous.

    ``split_heads`` then ``scaled_cosine_qk`` in one function, the same values: q and k are
    normalised straight from their strided views of the projection (no contiguous copy of them
    first); the backward computes dq and dk contiguous (an elementwise op that writes a strided
    view is ~1.5x slower on CPU than the contiguous op plus a copy) and copies each into its slot
    of the qkv gradient. Row dots via a matrix-vector product (_row_dot_fast). Measured (1 thread,
    bf16, tiny 256/W8 batch 8 shapes): ~20% less time than the two functions, fwd+bwd.
    """

    @staticmethod
    def forward(ctx, qkv, num_heads: int, scale):
        q, k, v = _head_views(qkv, num_heads)
        nq, fq = _cosine_factors(q, scale)
        nk, _ = _cosine_factors(k, None)
        qn = torch.mul(q, fq, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        kn = torch.div(k, nk, out=torch.empty(k.shape, dtype=k.dtype, device=k.device))
        ctx.save_for_backward(qn, kn, nq, nk, scale)
        return qn, kn, v.clone(memory_format=torch.contiguous_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dqn, dkn, dv):
        qn, kn, nq, nk, scale = ctx.saved_tensors
        B_, nH, N, hd = qn.shape
        fdt = wide_dtype(qn)
        dqkv = torch.empty(B_, N, 3, nH, hd, dtype=qn.dtype, device=qn.device)
        slot_q, slot_k, slot_v = dqkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B_, nH, N, hd) views
        ds = None
        s = scale.to(fdt)
        if dqn is None:
            slot_q.zero_()
        else:
            # qn = s q_hat, r = qn . g: dq = (s / |q|) g - qn r / (s |q|) (no projection where clamped)
            r = _row_dot_fast(qn, dqn).to(fdt)
            nqf = nq.to(fdt)
            proj = torch.where(nq > NORM_EPS, r / (s * nqf), 0.0).to(qn.dtype)
            slot_q.copy_((dqn * (s / nqf).to(qn.dtype)).addcmul_(qn, proj, value=-1))
            if ctx.needs_input_grad[2]:  # d s = sum over rows of q_hat . g = r / s
                ds = (r.sum(dim=tuple(i for i in range(r.ndim) if i != 1), keepdim=True).view(-1, 1, 1) / s)
                ds = ds.view(scale.shape).to(scale.dtype)
        if dkn is None:
            slot_k.zero_()
        else:
            proj = torch.where(nk > NORM_EPS, _row_dot_fast(kn, dkn).to(fdt) / nk.to(fdt), 0.0).to(kn.dtype)
            slot_k.copy_((dkn / nk).addcmul_(kn, proj, value=-1))
        if dv is None:
            slot_v.zero_()
        else:
            slot_v.copy_(dv)
        return dqkv.view(B_, N, 3 * nH * hd), None, ds


def split_heads_cosine(qkv: torch.Tensor, num_heads: int, scale: torch.Tensor):
    """(B_, N, 3*C), scale (nH, 1, 1) -> (s * normalize(q), normalize(k), v), each (B_, nH, N, hd)
    contiguous: split_heads + scaled_cosine_qk as one autograd function (see _SplitHeadsCosine), or,
    under torch.compile, as the readable expression (_split_heads_cosine_traced)."""
    if torch.compiler.is_compiling():
        return _split_heads_cosine_traced(qkv, num_heads, scale)
    return _SplitHeadsCosine.apply(qkv, num_heads, scale)


def _split_heads_cosine_traced(qkv: torch.Tensor, num_heads: int, scale: torch.Tensor):
    """What torch.compile traces: the readable formulation, so that inductor derives the backward and
    fuses both ways with the neighbouring copies. The hand-written backward saves eager passes but is
    opaque to inductor, which then writes more of them: the compiled 256^2/W8 step was 4% (fp32) and 6%
    (bf16) slower with it (docs/PERFORMANCE.md). In float32 inside the fused kernel (free there: a
    compiled CPU kernel computes bf16 in float32 lanes anyway), rounded once to the input's dtype."""
    q, k, v = _head_views(qkv, num_heads)
    wide = wide_dtype(qkv)
    qn = (F.normalize(q.to(wide), dim=-1) * scale).to(qkv.dtype)
    kn = F.normalize(k.to(wide), dim=-1).to(qkv.dtype)
    return qn.contiguous(), kn.contiguous(), v.contiguous()
