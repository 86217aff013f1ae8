"""Window attention of SwinV2: scaled cosine (or V1 dot) attention, log-spaced CPB, q/v bias.

Three interchangeable kernels compute the same function from the same inputs
(q, k, v, per-head scale, CPB bias (nH, N, N), optional window mask (nW, N, N)):

* ``reference``  - materialised softmax, written like the official code.
* ``fused``      - torch.nn.functional.scaled_dot_product_attention with bias+mask as a float mask.
* ``sequential`` - windows in chunks of ``chunk``; forward and backward never hold more than one
                   chunk's (chunk, nH, N, N) scores (the paper's "sequential self-attention").
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTENTION_KERNELS, ATTN_TYPES
from .windows import RegionMask

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # tau >= 0.01 (paper); no lower clamp (official)
CPB_HIDDEN = 512


# ---------------------------------------------------------------------------------------------
# Position-bias buffers
# ---------------------------------------------------------------------------------------------
def relative_coords_table(window_size: int, pretrained_window_size: int = 0,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 2M-1, 2M-1, 2) float32 log-spaced offsets fed to the CPB MLP (official code, not paper).

    Offsets are normalised by (P-1) with P the pretrained window (or M itself when P == 0),
    scaled to +-8, then sign(x) * log2(1+|x|) / log2(8).
    """
    M = window_size
    r = torch.arange(-(M - 1), M, dtype=torch.float32, device=device)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    P = pretrained_window_size if pretrained_window_size > 0 else M
    # max(.,1): a 1x1 window has only offset 0; the official code divides 0 by 0 here and gets NaN
    # (e.g. the HF image_size=56 report). Any divisor gives the same 0, so this is the only change.
    table = table / max(P - 1, 1) * 8.0
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8.0)


def relative_position_index(window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(M^2, M^2) int64: index (dy+M-1)*(2M-1) + (dx+M-1) into the flattened coords table."""
    M = window_size
    c = torch.arange(M, device=device)
    coords = torch.stack(torch.meshgrid(c, c, indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (M - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * M - 1) + rel[..., 1]


# ---------------------------------------------------------------------------------------------
# Kernels: (q, k, v, scale, bias, mask, attn_drop, chunk) -> (B_, nH, N, hd)
#   q, k, v: (B_, nH, N, hd) with B_ = B * nW, windows of one image contiguous (window_partition)
#   scale: (nH, 1, 1) tensor or float multiplying q.k; bias: (nH, N, N); mask: (nW, N, N) or None,
#   or a RegionMask (region ids (nW, N): the same mask, built per chunk of windows, never whole)
# ---------------------------------------------------------------------------------------------
def _dense_mask(mask, dtype: torch.dtype = torch.float32):
    return mask.dense(dtype) if isinstance(mask, RegionMask) else mask


def _mask_rows(mask, sel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(c, N, N) mask of the windows `sel`, in `dtype` (a RegionMask builds only these rows)."""
    if isinstance(mask, RegionMask):
        return mask.rows(sel, dtype)
    return mask.index_select(0, sel).to(dtype)


def _split_windows(t: torch.Tensor, n_windows: int) -> torch.Tensor:
    return t.view(t.shape[0] // n_windows, n_windows, *t.shape[1:])


def reference_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    # the mask in q's dtype, as the official buffer is after model.to(dtype): a float32 mask would
    # promote bf16 scores to float32 and the product with v would fail
    mask = None if mask is None else _dense_mask(mask, q.dtype).to(q.dtype)
    attn = q @ k.transpose(-2, -1)
    if not _is_one(scale):
        attn = attn * scale
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (_split_windows(attn, nW) + mask.unsqueeze(1).unsqueeze(0)).view_as(attn)
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=attn_drop > 0)
    return attn @ v


def _fused_sdpa_autograd(q, k, v, scale, bias, mask, attn_drop: float = 0.0):
    # Plain SDPA under autograd (used off-CPU): on CUDA the memory-efficient kernel takes a float
    # mask that requires grad. The (nW, nH, N, N) bias+mask is broadcast over the batch via a 5-D
    # (B, nW, nH, N, hd) view: no B copies.
    qs = q if _is_one(scale) else q * scale
    mask = _dense_mask(mask, bias.dtype)
    am = bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        am = bias.unsqueeze(0) + mask.unsqueeze(1)
        qs, k, v = (_split_windows(t, nW) for t in (qs, k, v))
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=am.to(qs.dtype), dropout_p=attn_drop, scale=1.0)
    return out.reshape(q.shape[0], *out.shape[-3:])


def fused_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    """One SDPA call per window group forward; chunked recompute backward (CPU).

    On CPU, SDPA's fast (flash) kernel refuses a float mask that requires grad and falls back to
    the materialising math path. So the CPU path is the custom autograd function below: forward =
    flash SDPA with the bias DETACHED (all unmasked windows in one call, all masked ones in
    another), backward = cache-sized chunks that recompute the probabilities from the saved
    log-sum-exp and accumulate the CPB-bias gradient over windows. Off CPU, plain SDPA autograd.
    """
    if q.device.type != "cpu":
        return _fused_sdpa_autograd(q, k, v, scale, bias, mask, attn_drop)
    qs = q if _is_one(scale) else q * scale
    return _WindowAttentionFn.apply(qs, k, v, bias, mask, 0, 0, float(attn_drop))


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


def _dropout_keep(shape, p: float, seed: int, start: int, device) -> torch.Tensor:
    # Per-chunk generator seeded from (seed, chunk start) so backward regenerates the same mask.
    g = torch.Generator(device=device)
    g.manual_seed(seed + start)
    return torch.rand(shape, generator=g, device=device) >= p


_GROUP_CACHE: dict[int, tuple] = {}  # id(mask) -> (weakref to mask, mask._version, groups)


def _window_groups(mask: Optional[torch.Tensor], n_windows: int) -> list[tuple[Optional[torch.Tensor], bool]]:
    """[(window positions or None for all, masked?)]: windows whose mask is all zero need only the
    bias, so they form one group and never touch the mask. Cached per mask tensor (a module buffer:
    the same object every forward; an in-place change bumps its version and recomputes). The cache
    holds a weak reference, so it neither keeps masks alive nor adds attributes to the buffer
    (state dicts and checkpoints are unchanged)."""
    if mask is None:
        return [(None, False)]
    region = isinstance(mask, RegionMask)
    if region:  # cache on the module's region-id buffer (the wrapper is rebuilt every forward)
        mask = mask.regions
    hit = _GROUP_CACHE.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    if region:
        flags = mask.amin(1) != mask.amax(1)  # more than one region in the window
    else:
        flags = (mask.amin((1, 2)) != 0) | (mask.amax((1, 2)) != 0)  # reductions: no (nW, N, N) temporary
    masked, plain = flags.nonzero().flatten(), (~flags).nonzero().flatten()
    groups = [(idx, m) for idx, m in ((plain, False), (masked, True)) if idx.numel()]
    if plain.numel() == n_windows:
        groups = [(None, False)]
    try:
        key = id(mask)
        _GROUP_CACHE[key] = (weakref.ref(mask, lambda _r, key=key: _GROUP_CACHE.pop(key, None)), mask._version, groups)
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return groups


def _take(t: torch.Tensor, idx: Optional[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Window positions [lo, hi) of group idx from a (B, nW, ...) view -> (B, c, ...)."""
    if idx is None:
        return t[:, lo:hi]
    return t.index_select(1, idx[lo:hi])


def _put(dst: torch.Tensor, idx: Optional[torch.Tensor], lo: int, hi: int, src: torch.Tensor) -> None:
    if idx is None:
        dst[:, lo:hi] = src
    else:
        dst.index_copy_(1, idx[lo:hi], src.to(dst.dtype))


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# fp32 scores per backward chunk of the fused kernel. Measured on the shared 2-core box: 4-8 MB
# (cache-sized) chunks are best single-threaded on an idle core but several times slower under load
# (many small parallel ops); 64 MB chunks were within 10% of the best in every condition tried.
FUSED_BACKWARD_CHUNK_BYTES = 64 << 20


def _flash_forward(q, k, v, am):
    """(out, logsumexp or None) of softmax(q k^T + am) v. q, k, v: (b, h, N, hd); am broadcastable."""
    if q.device.type == "cpu" and _FLASH_CPU is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=am, scale=1.0)
            return out, lse
        except RuntimeError:  # shapes/strides the private kernel does not take: public API below
            pass
    return F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=1.0), None


class _WindowAttentionFn(torch.autograd.Function):
    """softmax(q k^T + bias + mask) v over windows, never holding all windows' (N, N) scores.

    q (already scaled), k, v: (B*nW, nH, N, hd); bias (nH, N, N) shared by all windows (its
    gradient is the sum over windows, accumulated chunk by chunk); mask (nW, N, N) constant.
    Windows are visited by position (all B images of a position together), in two groups: positions
    whose mask is zero (bias only) and masked ones. `chunk_fwd` / `chunk_bwd` are windows per
    chunk (0 = the whole group forward / FUSED_BACKWARD_CHUNK_BYTES of scores backward). With dropout
    the forward materialises each chunk's probabilities and the backward replays the per-chunk
    dropout mask. Backward computes in float32 (or the input dtype if wider) from the saved
    log-sum-exp, in two score buffers that every chunk of the call reuses.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, chunk_fwd: int, chunk_bwd: int, p: float):
        B_, nH, N, hd = q.shape
        nW = mask.shape[0] if mask is not None else B_
        B = B_ // nW
        # q, k, v are usually strided views of the qkv projection: gathering masked windows from such
        # a view (index_select) would copy the whole tensor per chunk, so copy once here instead
        q, k, v = (t.contiguous() for t in (q, k, v))
        bias_d = bias.detach()  # a mask that requires grad would push CPU SDPA onto the math path
        groups = _window_groups(mask, nW)
        seed = int(torch.randint(0, 2**40, (1,)).item()) if p > 0 else 0
        q5, k5, v5 = (t.view(B, nW, nH, N, hd) for t in (q, k, v))
        out = torch.empty(B, nW, nH, N, hd, dtype=v.dtype, device=v.device)
        lse = torch.empty(B, nW, nH, N, dtype=torch.float32, device=q.device) if p == 0 else None
        have_lse = p == 0
        for gi, (idx, masked) in enumerate(groups):
            n = nW if idx is None else idx.numel()
            if chunk_fwd > 0:
                step = max(1, chunk_fwd // B)
            elif masked and p == 0:  # bias+mask of the group (c*nH, N, N): cap it like the backward chunks
                step = max(1, FUSED_BACKWARD_CHUNK_BYTES // (nH * N * N * 4))
            else:
                step = n
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                c = hi - lo
                qc, kc, vc = (_take(t, idx, lo, hi) for t in (q5, k5, v5))
                if p > 0:
                    cdt = torch.promote_types(q.dtype, torch.float32)
                    s = (qc @ kc.transpose(-2, -1)).to(cdt) + bias_d.to(cdt)
                    if masked:
                        s = s + _mask_rows(mask, idx[lo:hi], cdt).unsqueeze(1).unsqueeze(0)
                    attn = s.softmax(-1)
                    attn = attn * _dropout_keep(attn.shape, p, seed, gi * nW + lo, q.device) / (1 - p)
                    _put(out, idx, lo, hi, attn.to(v.dtype) @ vc)
                    continue
                if masked:  # (1, c*nH, N, N) broadcast over the B images: (B, c*nH, N, hd) views
                    am = (bias_d.unsqueeze(0) + _mask_rows(mask, idx[lo:hi], bias_d.dtype).unsqueeze(1))
                    o, l = _flash_forward(*(t.reshape(B, c * nH, N, hd) for t in (qc, kc, vc)),
                                          am.reshape(1, c * nH, N, N).to(q.dtype))
                else:  # (1, nH, N, N) broadcast over all B*c windows
                    am = bias_d.unsqueeze(0).to(q.dtype)
                    o, l = _flash_forward(*(t.reshape(B * c, nH, N, hd) for t in (qc, kc, vc)), am)
                del am, qc, kc, vc  # free this chunk's bias+mask before the next one is built
                _put(out, idx, lo, hi, o.reshape(B, c, nH, N, hd))
                if l is None:
                    have_lse = False
                else:
                    _put(lse, idx, lo, hi, l.reshape(B, c, nH, N).float())
        out = out.view(B_, nH, N, hd)
        ctx.region_mask = isinstance(mask, RegionMask)
        ctx.save_for_backward(q, k, v, bias_d, mask.regions if ctx.region_mask else mask, out,
                              lse if have_lse else None)
        ctx.groups, ctx.chunk_bwd, ctx.p, ctx.seed, ctx.chunk_fwd = groups, chunk_bwd, p, seed, chunk_fwd
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        if ctx.region_mask:
            mask = RegionMask(mask)
        p, seed, groups = ctx.p, ctx.seed, ctx.groups
        B_, nH, N, hd = q.shape
        nW = mask.shape[0] if mask is not None else B_
        B = B_ // nW
        cdt = torch.promote_types(q.dtype, torch.float32)
        need_q, need_k, need_v, need_b = ctx.needs_input_grad[:4]
        q5, k5, v5, o5, do5 = (t.view(B, nW, nH, N, hd) for t in (q, k, v, out, dout.contiguous()))
        dq = torch.empty_like(q5) if need_q else None
        dk = torch.empty_like(k5) if need_k else None
        dv = torch.empty_like(v5) if need_v else None
        dbias = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        lse5 = lse.view(B, nW, nH, N) if lse is not None else None
        if p > 0:  # the dropout masks were drawn per forward chunk: replay the same ranges
            steps = [n if ctx.chunk_fwd <= 0 else max(1, ctx.chunk_fwd // B) for n in _group_sizes(groups, nW)]
        elif ctx.chunk_bwd <= 0:
            steps = [max(1, FUSED_BACKWARD_CHUNK_BYTES // (B * nH * N * N * 4))] * len(groups)
        else:
            steps = [max(1, ctx.chunk_bwd // B)] * len(groups)
        # Two score-sized work buffers for ALL chunks of this call (scores/probabilities and their
        # gradient): a fresh (> 32 MB) tensor per chunk is a fresh mmap under glibc, and its first-touch
        # page faults cost a quarter of the CPU time at 1536^2. (b, N, N) so memory probes see scores.
        rows = B * min(max(steps), max(_group_sizes(groups, nW))) * nH
        s_buf = torch.empty(rows, N, N, dtype=cdt, device=q.device)
        ds_buf = torch.empty(rows, N, N, dtype=cdt, device=q.device)
        for gi, ((idx, masked), step) in enumerate(zip(groups, steps)):
            n = nW if idx is None else idx.numel()
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                c = hi - lo
                qc, kc, vc, doc, oc = (_take(t, idx, lo, hi).to(cdt).reshape(B * c * nH, N, hd)
                                       for t in (q5, k5, v5, do5, o5))
                s = torch.bmm(qc, kc.transpose(1, 2), out=s_buf[:B * c * nH]).view(B, c, nH, N, N)
                s += bias.to(cdt)
                if masked:
                    s += _mask_rows(mask, idx[lo:hi], cdt).unsqueeze(1).unsqueeze(0)
                if lse5 is not None:
                    prob = s.sub_(_take(lse5, idx, lo, hi).unsqueeze(-1).to(cdt)).exp_()
                else:
                    prob = s.softmax(-1)
                keep = None
                if p > 0:
                    # regenerate the forward chunk's mask: forward chunks are the same ranges
                    keep = _dropout_keep(prob.shape, p, seed, gi * nW + lo, q.device).to(cdt) / (1 - p)
                prob3 = prob.reshape(B * c * nH, N, N)
                if need_v:
                    dropped = prob3 * keep.view_as(prob3) if keep is not None else prob3
                    _bmm_into(dv, idx, lo, hi, dropped.transpose(1, 2), doc)
                    del dropped
                # dP (w.r.t. the dropped probabilities)
                ds = torch.bmm(doc, vc.transpose(1, 2), out=ds_buf[:B * c * nH])
                if keep is not None:
                    ds *= keep.view_as(ds)
                # dS = P * (dP - D), D_i = sum_j P_ij dP_ij = dO_i . O_i (with dropout too: O used the dropped P)
                ds.sub_((doc * oc).sum(-1, keepdim=True)).mul_(prob3)
                if need_q:
                    _bmm_into(dq, idx, lo, hi, ds, kc)
                if need_k:
                    _bmm_into(dk, idx, lo, hi, ds.transpose(1, 2), qc)
                if need_b:
                    dbias += ds.view(B * c, nH, N, N).sum(0)
                del s, prob, prob3, ds, keep, qc, kc, vc, doc, oc  # nothing of this chunk outlives it
        shape = (B_, nH, N, hd)
        return (dq.view(shape) if need_q else None, dk.view(shape) if need_k else None,
                dv.view(shape) if need_v else None, dbias.to(ctx.bias_dtype) if need_b else None,
                None, None, None, None)


def _group_sizes(groups, n_windows: int) -> list[int]:
    return [n_windows if idx is None else idx.numel() for idx, _ in groups]


def _bmm_into(dst: torch.Tensor, idx: Optional[torch.Tensor], lo: int, hi: int, a, b) -> None:
    """dst (B, nW, nH, N, hd)[:, window positions lo:hi of group idx] = a @ b (a, b: (B*c*nH, ., .)),
    written straight into dst when that slice is contiguous (one image, unmasked group) and of a's dtype."""
    if idx is None and dst.dtype == a.dtype:
        view = dst[:, lo:hi]
        if view.is_contiguous():
            torch.bmm(a, b, out=view.view(a.shape[0], *dst.shape[-2:]))
            return
    B = dst.shape[0]
    _put(dst, idx, lo, hi, torch.bmm(a, b).view(B, -1, *dst.shape[2:]))


class _SplitHeads(torch.autograd.Function):
    """qkv (B_, N, 3*C) -> q, k, v (B_, nH, N, hd), each a contiguous copy.

    The kernels want contiguous per-head tensors. Autograd of view/permute/unbind would stack the
    three gradients and then copy the stack back into the projection's layout (two passes over 3C
    per token); this backward writes each gradient into its slot of one (B_, N, 3, nH, hd) tensor.
    Copies also mean no output keeps the whole qkv tensor alive.
    """

    @staticmethod
    def forward(ctx, qkv, num_heads: int):
        B_, N, C3 = qkv.shape
        parts = qkv.view(B_, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in parts.unbind(0))

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


def sequential_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 32):
    """Windows in chunks of `chunk` (forward AND backward): at most `chunk` windows' scores exist."""
    qs = q if _is_one(scale) else q * scale
    return _WindowAttentionFn.apply(qs, k, v, bias, mask, int(chunk), int(chunk), float(attn_drop))


KERNELS: dict[str, Callable] = {
    "reference": reference_attention,
    "fused": fused_attention,
    "sequential": sequential_attention,
}
assert tuple(KERNELS) == ATTENTION_KERNELS


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head self-attention inside (M x M) windows with a continuous position bias.

    forward(x (B*nW, N, C), mask (nW, N, N) | None) -> (B*nW, N, C)
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window_size: int = 0,
                 attn_type: str = "cosine", kernel: str = "reference", sequential_chunk: int = 32):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"attention: unknown attention kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type: unknown attention type {attn_type!r}; valid: {', '.join(ATTN_TYPES)}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.head_dim = dim // num_heads
        self.pretrained_window_size = pretrained_window_size
        self.attn_type, self.kernel, self.sequential_chunk = attn_type, kernel, sequential_chunk
        self.attn_drop_p = attn_drop

        if attn_type == "cosine":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        M = window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * M - 1, 2 * M - 1, 2))
        self.register_buffer("relative_position_index", torch.empty(M * M, M * M, dtype=torch.long))
        self.reset_buffers()

        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:  # k gets no bias (official V2)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the geometry buffers in place (after to_empty() from meta, or a corrupt load)."""
        dev = self.relative_coords_table.device
        if dev.type == "meta":
            return
        self.relative_coords_table.copy_(relative_coords_table(self.window_size, self.pretrained_window_size))
        self.relative_position_index.copy_(relative_position_index(self.window_size))

    def position_bias(self) -> torch.Tensor:
        """(nH, N, N) = 16 * sigmoid(cpb_mlp(coords)) gathered by relative offset; once per forward."""
        N = self.window_size**2
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        # sigmoid on the (2M-1)^2 table before the gather (elementwise, so identical values, N^2/(2M-1)^2
        # times less work); index_select's backward is an index_add, faster on CPU than index_put
        table = 16 * torch.sigmoid(table.t())  # (nH, (2M-1)^2)
        return table.index_select(1, self.relative_position_index.view(-1)).view(self.num_heads, N, N)

    def logit_scale_value(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = split_heads(F.linear(x, self.qkv.weight, qkv_bias), self.num_heads)
        if self.attn_type == "cosine":
            q, k = scaled_cosine_qk(q, k, self.logit_scale_value())
        else:  # V1 scaled dot product, still with the CPB bias
            q = q * self.head_dim**-0.5
        scale = 1.0  # folded into q above; every kernel skips a multiply by the float 1.0
        bias = self.position_bias()
        drop = self.attn_drop_p if self.training else 0.0
        out = KERNELS[self.kernel](q, k, v, scale, bias, mask, drop, self.sequential_chunk)
        out = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, attn_type={self.attn_type}, "
                f"kernel={self.kernel}")
