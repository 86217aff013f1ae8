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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTENTION_KERNELS, ATTN_TYPES

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
#   scale: (nH, 1, 1) tensor or float multiplying q.k; bias: (nH, N, N); mask: (nW, N, N) or None
# ---------------------------------------------------------------------------------------------
def _split_windows(t: torch.Tensor, n_windows: int) -> torch.Tensor:
    return t.view(t.shape[0] // n_windows, n_windows, *t.shape[1:])


def reference_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (_split_windows(attn, nW) + mask.unsqueeze(1).unsqueeze(0)).view_as(attn)
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=attn_drop > 0)
    return attn @ v


def fused_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    # Cosine attention has its own learned scale, so q is pre-multiplied and SDPA gets scale=1.
    # On CPU, SDPA's fast (flash) path does not take a float mask that requires grad: while the
    # CPB bias needs a gradient (training) it falls back to the math path, which materialises the
    # scores like `reference`. In eval / no_grad the flash path runs. We accept that here (the
    # `sequential` kernel is the memory-bounded training path); speed work lives elsewhere.
    qs = q * scale
    am = bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        # (nW, nH, N, N), broadcast over the batch via a 5-D (B, nW, nH, N, hd) view: no B copies.
        am = bias.unsqueeze(0) + mask.unsqueeze(1)
        qs, k, v = (_split_windows(t, nW) for t in (qs, k, v))
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=am.to(qs.dtype), dropout_p=attn_drop, scale=1.0)
    return out.reshape(q.shape[0], *out.shape[-3:])


def _chunk_mask(bias: torch.Tensor, mask: Optional[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Bias + window mask for flattened windows [start, end): (end-start or 1, nH, N, N)."""
    if mask is None:
        return bias.unsqueeze(0)
    idx = torch.arange(start, end, device=mask.device) % mask.shape[0]
    return bias.unsqueeze(0) + mask.index_select(0, idx).unsqueeze(1)


def _dropout_keep(shape, p: float, seed: int, start: int, device) -> torch.Tensor:
    # Per-chunk generator seeded from (seed, chunk start) so backward regenerates the same mask.
    g = torch.Generator(device=device)
    g.manual_seed(seed + start)
    return torch.rand(shape, generator=g, device=device) >= p


class _SequentialAttention(torch.autograd.Function):
    """Chunked attention whose backward recomputes each chunk's softmax (no (B_, nH, N, N) tensor).

    The bias gradient is the sum over all windows, accumulated chunk by chunk; the mask is constant.
    Softmax math runs in at least float32 whatever the input dtype (e.g. under autocast).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, chunk: int, p: float):
        B_ = q.shape[0]
        seed = int(torch.randint(0, 2**40, (1,)).item()) if p > 0 else 0
        out = torch.empty_like(v)
        for s in range(0, B_, chunk):
            e = min(s + chunk, B_)
            am = _chunk_mask(bias, mask, s, e)
            if p == 0:
                # Inside Function.forward nothing requires grad, so SDPA may take its fast path.
                out[s:e] = F.scaled_dot_product_attention(q[s:e], k[s:e], v[s:e], attn_mask=am.to(q.dtype), scale=1.0)
            else:
                acc = torch.promote_types(q.dtype, torch.float32)
                attn = ((q[s:e] @ k[s:e].transpose(-2, -1)).to(acc) + am.to(acc)).softmax(-1)
                attn = attn * _dropout_keep(attn.shape, p, seed, s, q.device) / (1 - p)
                out[s:e] = (attn.to(v.dtype) @ v[s:e])
        ctx.save_for_backward(q, k, v, bias, mask, out)
        ctx.chunk, ctx.p, ctx.seed = chunk, p, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, mask, out = ctx.saved_tensors
        chunk, p, seed = ctx.chunk, ctx.p, ctx.seed
        need_q, need_k, need_v, need_b = ctx.needs_input_grad[:4]
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax math in >= float32
        dbias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, q.shape[0], chunk):
            e = min(s + chunk, q.shape[0])
            qc, kc, vc, do = (t[s:e].to(acc) for t in (q, k, v, dout))
            # sum_j P_ij dP_ij == dO_i . O_i (also with dropout, since O = (P * keep) @ V): no N x N temp
            delta = (do * out[s:e].to(acc)).sum(-1, keepdim=True)
            attn = ((qc @ kc.transpose(-2, -1)) + _chunk_mask(bias, mask, s, e).to(acc)).softmax(-1)
            if p > 0:
                keep = _dropout_keep(attn.shape, p, seed, s, q.device) / (1 - p)
                attn_d = attn * keep
            else:
                attn_d = attn
            if need_v:
                dv[s:e] = (attn_d.transpose(-2, -1) @ do).to(dv.dtype)
            del attn_d
            dattn = do @ vc.transpose(-2, -1)
            if p > 0:
                dattn.mul_(keep)
            # softmax backward: dS = P * (dP - sum_j P dP), in place on dP
            ds = dattn.sub_(delta).mul_(attn)
            del attn
            if need_q:
                dq[s:e] = (ds @ kc).to(dq.dtype)
            if need_k:
                dk[s:e] = (ds.transpose(-2, -1) @ qc).to(dk.dtype)
            if need_b:
                dbias += ds.sum(0)
        return dq, dk, dv, (dbias.to(bias.dtype) if need_b else None), None, None, None


def sequential_attention(q, k, v, scale, bias, mask, attn_drop: float = 0.0, chunk: int = 32):
    return _SequentialAttention.apply(q * scale, k, v, bias, mask, int(chunk), float(attn_drop))


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
        bias = table[self.relative_position_index.view(-1)].view(N, N, self.num_heads)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def logit_scale_value(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_type == "cosine":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = self.logit_scale_value()
        else:  # V1 scaled dot product, still with the CPB bias
            scale = self.head_dim**-0.5
        bias = self.position_bias()
        drop = self.attn_drop_p if self.training else 0.0
        out = KERNELS[self.kernel](q, k, v, scale, bias, mask, drop, self.sequential_chunk)
        out = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, attn_type={self.attn_type}, "
                f"kernel={self.kernel}")
