"""Window partition / reverse, cyclic shift and the cached shifted-window mask."""
from __future__ import annotations

from functools import lru_cache

import torch

MASK_VALUE = -100.0  # official value (not -inf): released checkpoints were trained with it


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window_size, window_size, C), windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def cyclic_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Roll a (B, H, W, C) map by -shift on H and W (shift windows); pass -shift to undo."""
    if shift == 0:
        return x
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))


def reverse_cyclic_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    return cyclic_shift(x, -shift)


@lru_cache(maxsize=8)  # small: at 1536/W24 one stage-1 mask is 340 MB
def _shifted_window_mask_cpu(H: int, W: int, window_size: int, shift: int) -> torch.Tensor:
    # Label the 3x3 slice regions of the shifted image; tokens in one window that came from
    # different regions were not neighbours before the roll, so they must not attend.
    img = torch.zeros(1, H, W, 1, device="cpu")
    slices = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    region = 0
    for hs in slices:
        for ws in slices:
            img[:, hs, ws, :] = region
            region += 1
    labels = window_partition(img, window_size).view(-1, window_size * window_size)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


def shifted_window_mask(H: int, W: int, window_size: int, shift: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Additive mask (nW, N, N) with 0 within a region and -100 across regions.

    Computed on CPU and cached per geometry; a fresh copy is returned so callers own it.
    On the meta device only the shape is produced (nothing is computed).
    """
    if shift <= 0:
        raise ValueError(f"shifted_window_mask needs shift > 0, got {shift}")
    device = torch.empty(0).device if device is None else torch.device(device)  # honours `with torch.device(...)`
    n_win, n_tok = (H // window_size) * (W // window_size), window_size * window_size
    if device.type == "meta":
        return torch.empty(n_win, n_tok, n_tok, device=device)
    return _shifted_window_mask_cpu(H, W, window_size, shift).to(device, copy=True)
