"""Window attention of SwinV2: scaled cosine (or V1 dot) attention, log-spaced CPB, q/v bias.

The module computes q, k, v (the scale folded into q) and the continuous position bias, then hands them to one of
the interchangeable kernels of :mod:`swinv2.kernels` (``reference``: materialised softmax like the
official code; ``fused`` / ``sequential``: the device-tuned, chunked forms of the same function).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTN_TYPES, DEFAULTS
from .kernels import KERNELS, split_heads, split_heads_cosine

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
# Module
# ---------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head self-attention inside (M x M) windows with a continuous position bias.

    forward(x (B*nW, N, C), mask (nW, N, N) | RegionMask | None) -> (B*nW, N, C)
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = DEFAULTS.qkv_bias,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window_size: int = 0,
                 attn_type: str = DEFAULTS.attn_type, kernel: str = DEFAULTS.attention,
                 sequential_chunk: int = DEFAULTS.sequential_chunk):
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
        """(nH, 1, 1) s = exp(min(logit_scale, ln 100)), in float32 (float64 for a float64 model).

        float32 even in a bf16 model (nH numbers, no cost): s multiplies every logit of a head, so its
        error is systematic, not rounding noise. Clamped in bf16, ln 100 rounds to 4.594 (s <= 98.9,
        tau >= 0.0101) and exp's result to 8 bits (up to 0.4% off, on every logit of the head); here
        the clamp is the official bound and s = exp(parameter) to float32 precision."""
        s = self.logit_scale
        return torch.clamp(s.to(torch.promote_types(s.dtype, torch.float32)), max=LOGIT_SCALE_MAX).exp()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        if self.attn_type == "cosine":  # split, s * normalize(q), normalize(k): one function (kernels/qk.py)
            q, k, v = split_heads_cosine(qkv, self.num_heads, self.logit_scale_value())
        else:  # V1 scaled dot product, still with the CPB bias
            q, k, v = split_heads(qkv, self.num_heads)
            q = q * self.head_dim**-0.5
        # the scale is folded into q above, so the kernels take none
        bias = self.position_bias()
        drop = self.attn_drop_p if self.training else 0.0
        out = KERNELS[self.kernel](q, k, v, bias, mask, drop, self.sequential_chunk)
        out = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, attn_type={self.attn_type}, "
                f"kernel={self.kernel}")
