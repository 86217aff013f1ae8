"""The fast kernels ``fused`` and ``sequential``: flash forward, chunked recompute backward.

Same function as :func:`swinv2.kernels.reference.reference_attention` (tests hold them equal), tuned
for the CPU of docs/PERFORMANCE.md:

* forward: the private CPU flash op (it returns the log-sum-exp the backward reuses) with the bias
  DETACHED, because a float mask that requires grad pushes CPU SDPA onto its materialising path;
* backward: windows in chunks that recompute the probabilities from the saved log-sum-exp and
  accumulate the bias gradient over windows, in two score buffers reused by every chunk;
* windows grouped by position into unmasked (bias only) and masked ones, cached per mask buffer.

The chunked engine is two ``torch.library`` custom ops, ``swinv2::window_attention`` and its backward
``swinv2::window_attention_backward``, with fake (shape-only) implementations and the autograd
formula registered: ``torch.compile`` sees one opaque node per call whose output shapes it knows, so
the data-dependent window grouping (``nonzero``), the mask cache and the chunk loops cause no graph
break and no recompilation. Off CPU, ``fused`` is plain SDPA under autograd, which inductor lowers to
the device's fused kernel (on CUDA the memory-efficient one, which takes a bias that needs a
gradient). ``sequential`` is the chunked engine everywhere, with ``chunk`` windows per chunk forward
AND backward (the paper's "sequential self-attention").
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..windows import RegionMask
from .reference import dense_mask, mask_rows, wide_dtype

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# fp32 scores per backward chunk of the fused kernel (its masked forward chunks too). Small chunks
# keep each pass over the scores in cache but make many small parallel ops, which stall when another
# process holds a core. Backward of one 1536^2/W24 stage-1 layer (2-core Xeon, 2026-12-02): quiet,
# 64 MB 0.94 s, 32 MB 0.61 s, 16 MB 0.55 s, 4 MB 0.82 s; over all layers 32 MB is 31% faster than 64 MB
# quiet, 3% slower beside a 1-thread busy process, 20% slower oversubscribed (a 2-thread one), where
# 16 MB is up to 3x slower. See docs/PERFORMANCE.md ("Fused backward chunk").
FUSED_BACKWARD_CHUNK_BYTES = 32 << 20


# ---------------------------------------------------------------------------------------------
# the two kernels
# ---------------------------------------------------------------------------------------------
def fused_attention(q, k, v, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    """One SDPA call per window group forward; chunked recompute backward (CPU). `chunk` is ignored."""
    if q.device.type != "cpu":
        return _sdpa_autograd(q, k, v, bias, mask, attn_drop)
    return _chunked_attention(q, k, v, bias, mask, 0, 0, attn_drop)


def sequential_attention(q, k, v, bias, mask, attn_drop: float = 0.0, chunk: int = 32):
    """Windows in chunks of `chunk` (forward AND backward): at most `chunk` windows' scores exist."""
    return _chunked_attention(q, k, v, bias, mask, int(chunk), int(chunk), attn_drop)


def _chunked_attention(q, k, v, bias, mask, chunk_fwd: int, chunk_bwd: int, p: float):
    """The custom op's call: a RegionMask travels as its region-id tensor and `padded` flag, and the
    dropout seed is drawn here, outside the op, so that compile and checkpoint recomputation see it."""
    region = isinstance(mask, RegionMask)
    seed = torch.randint(0, 2**40, (), device=q.device) if p > 0 else None
    out, _lse = torch.ops.swinv2.window_attention(
        q, k, v, bias, mask.regions if region else mask, region, region and mask.padded, seed,
        int(chunk_fwd), int(chunk_bwd), float(p))
    return out


def _sdpa_autograd(q, k, v, bias, mask, attn_drop: float = 0.0):
    # Plain SDPA under autograd (used off-CPU): on CUDA the memory-efficient kernel takes a float
    # mask that requires grad. Its kernels want 4-D tensors, so a mask's windows become heads:
    # (B, nW*nH, N, hd) views against a (1, nW*nH, N, N) bias+mask, broadcast over the B images.
    mask = dense_mask(mask, bias.dtype)
    if mask is None:
        am = bias.unsqueeze(0)
    else:
        nW = mask.shape[0]
        am = (bias.unsqueeze(0) + mask.unsqueeze(1)).flatten(0, 1).unsqueeze(0)
        q, k, v = (t.reshape(t.shape[0] // nW, nW * t.shape[1], *t.shape[2:]) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=am.to(q.dtype), dropout_p=attn_drop, scale=1.0)
    return out.reshape(-1, bias.shape[0], *out.shape[-2:])


# ---------------------------------------------------------------------------------------------
# window groups and chunk plumbing
# ---------------------------------------------------------------------------------------------
_GROUP_CACHE: dict[int, tuple] = {}  # id(mask) -> (weakref to mask, mask._version, groups)


def _window_groups(mask, n_windows: int) -> list[tuple[Optional[torch.Tensor], bool]]:
    """[(window positions or None for all, masked?)]: windows whose mask is all zero need only the
    bias, so they form one group and never touch the mask. Cached per mask tensor (a module buffer:
    the same object every forward; an in-place change bumps its version and recomputes)."""
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
    _cache_groups(mask, groups)
    return groups


def _cache_groups(mask: torch.Tensor, groups: list) -> None:
    # A weak reference: the cache neither keeps masks alive nor adds attributes to the buffer
    # (state dicts and saved weights are unchanged); the entry goes when the mask does.
    key = id(mask)
    try:
        _GROUP_CACHE[key] = (weakref.ref(mask, lambda _r, key=key: _GROUP_CACHE.pop(key, None)), mask._version, groups)
    except TypeError:  # not weak-referenceable: just do not cache
        pass


def _group_sizes(groups, n_windows: int) -> list[int]:
    return [n_windows if idx is None else idx.numel() for idx, _ in groups]


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


def _dropout_keep(shape, p: float, seed: int, start: int, device) -> torch.Tensor:
    # Per-chunk generator seeded from (seed, chunk start) so backward regenerates the same mask.
    g = torch.Generator(device=device)
    g.manual_seed(seed + start)
    return torch.rand(shape, generator=g, device=device) >= p


def _flash_forward(q, k, v, am):
    """(out, log-sum-exp) of softmax(q k^T + am) v. q, k, v: (b, h, N, hd); am broadcastable."""
    if q.device.type == "cpu" and _FLASH_CPU is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=am, scale=1.0)
            return out, lse
        except RuntimeError:  # shapes/strides the private kernel does not take: the math below
            pass
    s = (q @ k.transpose(-2, -1)).to(wide_dtype(q)) + am
    lse = s.logsumexp(-1, keepdim=True)
    return (s - lse).exp().to(v.dtype) @ v, lse.squeeze(-1)


def _forward_step(chunk_fwd: int, B: int, n: int, masked: bool, p: float, nH: int, N: int) -> int:
    """Windows per forward chunk of a group of n window positions."""
    if chunk_fwd > 0:
        return max(1, chunk_fwd // B)
    if masked and p == 0:  # bias+mask of the group (c*nH, N, N): cap it like the backward chunks
        return max(1, FUSED_BACKWARD_CHUNK_BYTES // (nH * N * N * 4))
    return n


def _backward_steps(groups, n_windows: int, B: int, nH: int, N: int, chunk_fwd: int, chunk_bwd: int,
                    p: float) -> list[int]:
    """Windows per backward chunk of every group."""
    if p > 0:  # the dropout masks were drawn per forward chunk: replay the same ranges
        return [n if chunk_fwd <= 0 else max(1, chunk_fwd // B) for n in _group_sizes(groups, n_windows)]
    if chunk_bwd <= 0:
        return [max(1, FUSED_BACKWARD_CHUNK_BYTES // (B * nH * N * N * 4))] * len(groups)
    return [max(1, chunk_bwd // B)] * len(groups)


# ---------------------------------------------------------------------------------------------
# forward chunks: write out (and the log-sum-exp) of windows [lo, hi) of one group
# ---------------------------------------------------------------------------------------------
def _forward_chunk_dropout(q5, k5, v5, bias, mask, idx, masked, lo, hi, p, seed, start, out, lse):
    # with dropout the probabilities are materialised (the flash op takes no replayable mask)
    qc, kc, vc = (_take(t, idx, lo, hi) for t in (q5, k5, v5))
    cdt = wide_dtype(q5)
    s = (qc @ kc.transpose(-2, -1)).to(cdt) + bias.to(cdt)
    if masked:
        s = s + mask_rows(mask, idx[lo:hi], cdt).unsqueeze(1).unsqueeze(0)
    l = s.logsumexp(-1, keepdim=True)
    attn = (s - l).exp_()
    attn = attn * _dropout_keep(attn.shape, p, seed, start, q5.device) / (1 - p)
    _put(out, idx, lo, hi, attn.to(v5.dtype) @ vc)
    _put(lse, idx, lo, hi, l.squeeze(-1))


def _forward_chunk_flash(q5, k5, v5, bias, mask, idx, masked, lo, hi, out, lse) -> None:
    """Flash forward of one chunk: out and the log-sum-exp of windows [lo, hi) of one group."""
    B, _, nH, N, hd = q5.shape
    c = hi - lo
    qc, kc, vc = (_take(t, idx, lo, hi) for t in (q5, k5, v5))
    if masked:  # (1, c*nH, N, N) broadcast over the B images: (B, c*nH, N, hd) views
        am = (bias.unsqueeze(0) + mask_rows(mask, idx[lo:hi], bias.dtype).unsqueeze(1))
        o, l = _flash_forward(*(t.reshape(B, c * nH, N, hd) for t in (qc, kc, vc)),
                              am.reshape(1, c * nH, N, N).to(q5.dtype))
    else:  # (1, nH, N, N) broadcast over all B*c windows
        am = bias.unsqueeze(0).to(q5.dtype)
        o, l = _flash_forward(*(t.reshape(B * c, nH, N, hd) for t in (qc, kc, vc)), am)
    del am, qc, kc, vc  # free this chunk's bias+mask before the next one is built
    _put(out, idx, lo, hi, o.reshape(B, c, nH, N, hd))
    _put(lse, idx, lo, hi, l.reshape(B, c, nH, N))


# ---------------------------------------------------------------------------------------------
# backward chunk: gradients of windows [lo, hi) of one group
# ---------------------------------------------------------------------------------------------
def _backward_chunk(t5, lse5, bias, mask, idx, masked, lo, hi, bufs, grads, keep_fn):
    """t5 = (q5, k5, v5, do5, o5) (dout before out); grads = (dq, dk, dv, dbias), None where not needed;
    bufs = (scores, dS) in float32 (or wider) and, for narrower inputs, a third in their dtype;
    keep_fn(shape) -> the forward chunk's dropout keep mask scaled by 1/(1-p), or None.

    Scores, probabilities and dS are float32: the recomputed scores must meet the forward's float32
    log-sum-exp (a bf16 score near 100 is off by up to 0.25, a probability by up to 28%). The four
    products after it (dV, dP, dQ, dK) run in the inputs' dtype, as autograd of the reference does:
    in bf16 they are several times faster than float32 products on casted copies."""
    q5 = t5[0]
    B, _, nH, N, hd = q5.shape
    rows = B * (hi - lo) * nH
    cdt, pdt = wide_dtype(q5), q5.dtype
    narrow = bufs[2][:rows] if pdt != cdt else None  # (rows, N, N) in pdt: products' operands/outputs
    dq, dk, dv, dbias = grads
    qc, kc, vc, doc, oc = (_take(t, idx, lo, hi).reshape(rows, N, hd) for t in t5)
    s = torch.bmm(qc.to(cdt), kc.to(cdt).transpose(1, 2), out=bufs[0][:rows]).view(B, hi - lo, nH, N, N)
    s += bias.to(cdt)
    if masked:
        s += mask_rows(mask, idx[lo:hi], cdt).unsqueeze(1).unsqueeze(0)
    prob = s.sub_(_take(lse5, idx, lo, hi).unsqueeze(-1).to(cdt)).exp_()
    keep = keep_fn(prob.shape)
    prob3 = prob.reshape(rows, N, N)
    if dv is not None:
        dropped = prob3 * keep.view_as(prob3) if keep is not None else prob3
        _bmm_into(dv, idx, lo, hi, _narrowed(dropped, narrow).transpose(1, 2), doc)
        del dropped
    # dP (w.r.t. the dropped probabilities), then dS in place of it
    if narrow is None:
        ds = torch.bmm(doc, vc.transpose(1, 2), out=bufs[1][:rows])
    else:
        ds = bufs[1][:rows].copy_(torch.bmm(doc, vc.transpose(1, 2), out=narrow))
    if keep is not None:
        ds *= keep.view_as(ds)
    # dS = P * (dP - D), D_i = sum_j P_ij dP_ij = dO_i . O_i (with dropout too: O used the dropped P)
    ds.sub_((doc.to(cdt) * oc.to(cdt)).sum(-1, keepdim=True)).mul_(prob3)
    if dq is not None or dk is not None:
        dsn = _narrowed(ds, narrow)
        if dq is not None:
            _bmm_into(dq, idx, lo, hi, dsn, kc)
        if dk is not None:
            _bmm_into(dk, idx, lo, hi, dsn.transpose(1, 2), qc)
    if dbias is not None:
        dbias += ds.view(-1, nH, N, N).sum(0)
    # nothing of this chunk outlives the call (locals), so the next chunk reuses the memory


def _narrowed(t: torch.Tensor, buf: Optional[torch.Tensor]) -> torch.Tensor:
    """t itself (float32 inputs) or its copy in the inputs' narrower dtype, written into buf."""
    return t if buf is None else buf.copy_(t)


# ---------------------------------------------------------------------------------------------
# the custom ops: forward, backward, their fake (shape) functions and the autograd formula
# ---------------------------------------------------------------------------------------------
# softmax(q k^T + bias + mask) v over windows, never holding all windows' (N, N) scores.
# q (already scaled), k, v: (B*nW, nH, N, hd); bias (nH, N, N) shared by all windows (its gradient
# is the sum over windows, accumulated chunk by chunk); mask: None, a dense (nW, N, N) additive mask
# or, with `region`, the (nW, N) region ids of a RegionMask (`padded` its flag); the mask is constant.
# Windows are visited by position (all B images of a position together), in two groups: positions
# whose mask is zero (bias only) and masked ones. `chunk_fwd` / `chunk_bwd` are windows per chunk
# (0 = the whole group forward / FUSED_BACKWARD_CHUNK_BYTES of scores backward). With dropout (`seed`
# given) the forward materialises each chunk's probabilities and the backward replays the per-chunk
# dropout mask. The forward also returns the log-sum-exp (B*nW, nH, N) in wide_dtype (float32, float64
# for float64 inputs); the backward recomputes the probabilities in that dtype from it, in score
# buffers that every chunk reuses.
def _op_mask(mask: Optional[torch.Tensor], region: bool, padded: bool):
    return RegionMask(mask, padded) if region else mask


@torch.library.custom_op("swinv2::window_attention", mutates_args=())
def window_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        mask: Optional[torch.Tensor], region: bool, padded: bool, seed: Optional[torch.Tensor],
                        chunk_fwd: int, chunk_bwd: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    B_, nH, N, hd = q.shape
    mask = _op_mask(mask, region, padded)
    nW = mask.shape[0] if mask is not None else B_
    B = B_ // nW
    # q, k, v are usually strided views of the qkv projection: gathering masked windows from such
    # a view (index_select) would copy the whole tensor per chunk, so copy once here instead
    q5, k5, v5 = (t.contiguous().view(B, nW, nH, N, hd) for t in (q, k, v))
    bias = bias.detach()  # a mask that requires grad would push CPU SDPA onto the math path
    out = torch.empty(B, nW, nH, N, hd, dtype=v.dtype, device=v.device)
    lse = torch.empty(B, nW, nH, N, dtype=wide_dtype(q), device=q.device)
    for gi, (idx, masked) in enumerate(_window_groups(mask, nW)):
        n = nW if idx is None else idx.numel()
        step = _forward_step(chunk_fwd, B, n, masked, p, nH, N)
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            if p > 0:
                _forward_chunk_dropout(q5, k5, v5, bias, mask, idx, masked, lo, hi, p, int(seed), gi * nW + lo,
                                       out, lse)
            else:
                _forward_chunk_flash(q5, k5, v5, bias, mask, idx, masked, lo, hi, out, lse)
    return out.view(B_, nH, N, hd), lse.view(B_, nH, N)


@window_attention_op.register_fake
def _(q, k, v, bias, mask, region, padded, seed, chunk_fwd, chunk_bwd, p):
    return q.new_empty(q.shape, dtype=v.dtype), q.new_empty(q.shape[:-1], dtype=wide_dtype(q))


@torch.library.custom_op("swinv2::window_attention_backward", mutates_args=())
def window_attention_backward_op(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
        mask: Optional[torch.Tensor], region: bool, padded: bool, seed: Optional[torch.Tensor],
        chunk_fwd: int, chunk_bwd: int, p: float, out: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B_, nH, N, hd = q.shape
    mask = _op_mask(mask, region, padded)
    nW = mask.shape[0] if mask is not None else B_
    B = B_ // nW
    cdt = wide_dtype(q)
    t5 = tuple(t.contiguous().view(B, nW, nH, N, hd) for t in (q, k, v, dout, out))
    grads = (*(torch.empty_like(t) for t in t5[:3]), torch.zeros(bias.shape, dtype=cdt, device=bias.device))
    lse5 = lse.view(B, nW, nH, N)
    groups = _window_groups(mask, nW)
    steps = _backward_steps(groups, nW, B, nH, N, chunk_fwd, chunk_bwd, p)
    # Two score-sized work buffers for ALL chunks of this call (scores/probabilities and their
    # gradient; a third in the inputs' dtype when it is narrower than float32): a fresh tensor per
    # chunk is a fresh mmap under glibc's default, and its first-touch page faults cost a quarter of
    # the CPU time at 1536^2. (b, N, N) so memory probes see scores.
    rows = B * min(max(steps), max(_group_sizes(groups, nW))) * nH
    dtypes = (cdt, cdt) if q.dtype == cdt else (cdt, cdt, q.dtype)
    bufs = tuple(torch.empty(rows, N, N, dtype=dt, device=q.device) for dt in dtypes)
    for gi, ((idx, masked), step) in enumerate(zip(groups, steps)):
        n = nW if idx is None else idx.numel()
        for lo in range(0, n, step):
            # regenerate the forward chunk's dropout mask: forward chunks are the same ranges
            keep_fn = ((lambda shape, start=gi * nW + lo: _dropout_keep(shape, p, int(seed), start, q.device)
                        .to(cdt) / (1 - p)) if p > 0 else (lambda shape: None))
            _backward_chunk(t5, lse5, bias, mask, idx, masked, lo, min(lo + step, n), bufs, grads, keep_fn)
    dq, dk, dv, dbias = grads
    return dq.view(B_, nH, N, hd), dk.view(B_, nH, N, hd), dv.view(B_, nH, N, hd), dbias.to(bias.dtype)


@window_attention_backward_op.register_fake
def _(dout, q, k, v, bias, mask, region, padded, seed, chunk_fwd, chunk_bwd, p, out, lse):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, region, padded, seed, chunk_fwd, chunk_bwd, p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, seed, out, lse)
    ctx.options = (region, padded, chunk_fwd, chunk_bwd, p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, mask, seed, out, lse = ctx.saved_tensors
    region, padded, chunk_fwd, chunk_bwd, p = ctx.options
    dq, dk, dv, dbias = torch.ops.swinv2.window_attention_backward(
        dout, q, k, v, bias, mask, region, padded, seed, chunk_fwd, chunk_bwd, p, out, lse)
    return dq, dk, dv, dbias, None, None, None, None, None, None, None


window_attention_op.register_autograd(_backward, setup_context=_setup_context)
