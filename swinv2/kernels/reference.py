"""The readable attention kernel: materialised scores and softmax, as the official code writes it.

Also the two mask helpers every kernel shares (a mask is dense or a RegionMask, see the package doc).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..windows import RegionMask


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors: the dtype of scores, probabilities, log-sum-exp and
    per-row factors when the tensors themselves are narrower (bf16, fp16)."""
    return torch.promote_types(t.dtype, torch.float32)


def dense_mask(mask, dtype: torch.dtype = torch.float32):
    """The (nW, N, N) additive mask of a dense mask or a RegionMask (None stays None)."""
    return mask.dense(dtype) if isinstance(mask, RegionMask) else mask


def mask_rows(mask, sel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(c, N, N) mask of the windows `sel`, in `dtype` (a RegionMask builds only these rows)."""
    if isinstance(mask, RegionMask):
        return mask.rows(sel, dtype)
    return mask.index_select(0, sel).to(dtype)


def split_windows(t: torch.Tensor, n_windows: int) -> torch.Tensor:
    """(B * nW, ...) -> (B, nW, ...): the window position becomes its own dim for the mask."""
    return t.view(t.shape[0] // n_windows, n_windows, *t.shape[1:])


def reference_attention(q, k, v, bias, mask, attn_drop: float = 0.0, chunk: int = 0):
    """softmax(q k^T + bias + mask) v, every window's scores at once. `chunk` is ignored."""
    # the mask in q's dtype, as the official buffer is after model.to(dtype): a float32 mask would
    # promote bf16 scores to float32 and the product with v would fail
    mask = None if mask is None else dense_mask(mask, q.dtype).to(q.dtype)
    attn = q @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (split_windows(attn, nW) + mask.unsqueeze(1).unsqueeze(0)).view_as(attn)
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=attn_drop > 0)
    return attn @ v
