"""Window partition / reverse, cyclic shift and the shifted-window mask (dense, or compact region ids)."""
from __future__ import annotations

from functools import lru_cache

import torch

MASK_VALUE = -100.0  # official value (not -inf): the released weights were trained with it


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


def _token_order(H: int, W: int, window_size: int, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse), int64 (H*W,): token order[p] of the map lands at position p of the windows
    of the shifted map (window_partition(cyclic_shift(., shift)) flattened); inverse undoes it."""
    if torch.compiler.is_compiling():  # traced into the graph (a little index arithmetic), not cached:
        return _token_order_uncached(H, W, window_size, shift, device)  # dynamo would skip the cache and warn
    return _token_order_cached(H, W, window_size, shift, device)


def _token_order_uncached(H: int, W: int, window_size: int, shift: int, device: torch.device):
    order = window_partition(cyclic_shift(torch.arange(H * W).view(1, H, W, 1), shift), window_size).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device)


_token_order_cached = lru_cache(maxsize=64)(_token_order_uncached)


class _GatherTokens(torch.autograd.Function):
    """x (B, L, C) -> x[:, order]: a permutation of tokens, whose backward is the inverse permutation
    (one gather each way; autograd of index_select would zero-fill and scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.inverse = inverse
        return x.index_select(1, order)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g.index_select(1, ctx.inverse), None, None


def shifted_window_partition(x: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C) = window_partition(cyclic_shift(x, shift), ws) as ONE copy
    (a token gather) instead of three (torch.roll over two dims copies twice, the partition once);
    the backward is one gather too. Same values, bit for bit."""
    B, H, W, C = x.shape
    order, inverse = _token_order(H, W, window_size, shift, x.device)
    return _GatherTokens.apply(x.reshape(B, H * W, C), order, inverse).view(-1, window_size * window_size, C)


def shifted_window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int, shift: int) -> torch.Tensor:
    """Inverse of shifted_window_partition: (B * nW, ws * ws, C) -> (B, H, W, C)
    = reverse_cyclic_shift(window_reverse(windows, ws, H, W), shift), one gather each way."""
    C = windows.shape[-1]
    order, inverse = _token_order(H, W, window_size, shift, windows.device)
    return _GatherTokens.apply(windows.reshape(-1, H * W, C), inverse, order).view(-1, H, W, C)


PAD_REGION = -1  # region id of padded tokens (pad_to_window); real regions are 0..8


@lru_cache(maxsize=32)  # (nW, N) int8: 147 KB at 1536/W24 stage 1 (the dense mask would be 340 MB)
def _window_regions_cpu(H: int, W: int, window_size: int, shift: int, pad: int) -> torch.Tensor:
    # Label the 3x3 slice regions of the shifted (padded) image; tokens in one window that came from
    # different regions were not neighbours before the roll, so they must not attend. As in the
    # official detection backbone the map is padded BEFORE the roll, so the slices are taken on the
    # padded map; padded tokens then get their own id wherever the roll moved them.
    Hp, Wp = H + pad, W + pad
    img = torch.zeros(1, Hp, Wp, 1, dtype=torch.int8, device="cpu")
    if shift > 0:
        slices = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
        region = 0
        for hs in slices:
            for ws in slices:
                img[:, hs, ws, :] = region
                region += 1
    if pad:
        is_pad = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device="cpu")
        is_pad[:, H:], is_pad[:, :, W:] = True, True
        img[cyclic_shift(is_pad, shift)] = PAD_REGION
    return window_partition(img, window_size).reshape(-1, window_size * window_size)


def window_regions(H: int, W: int, window_size: int, shift: int, pad: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor | None:
    """(nW, N) int8 region id of every token of every (shifted, padded) window, or None when
    there is nothing to mask (no shift, no padding). H, W: the real map; `pad` tokens are added at
    the bottom/right (ids PAD_REGION). A fresh copy; shape only on meta."""
    if shift == 0 and pad == 0:
        return None
    device = torch.empty(0).device if device is None else torch.device(device)
    if device.type == "meta":
        n_win, n_tok = ((H + pad) // window_size) * ((W + pad) // window_size), window_size * window_size
        return torch.empty(n_win, n_tok, dtype=torch.int8, device=device)
    return _window_regions_cpu(H, W, window_size, shift, pad).to(device, copy=True)


def shifted_window_regions(H: int, W: int, window_size: int, shift: int,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """(nW, N) int8 region id of every token of every shifted window (row-major windows).

    The compact form of :func:`shifted_window_mask`: the mask is MASK_VALUE exactly where the two
    tokens' region ids differ (:func:`mask_from_regions`). A fresh copy; shape only on meta."""
    if shift <= 0:
        raise ValueError(f"shifted_window_regions needs shift > 0, got {shift}")
    return window_regions(H, W, window_size, shift, 0, device)


def mask_from_regions(regions: torch.Tensor, dtype: torch.dtype = torch.float32, padded: bool = False) -> torch.Tensor:
    """(c, N) region ids -> (c, N, N) additive mask: 0 within a region, MASK_VALUE across (the
    official construction: labels.unsqueeze(1) - labels.unsqueeze(2) != 0, same values bit for bit).

    `padded`: also -inf between a padded token (id PAD_REGION) and a real one, both ways, so padding
    has exactly no effect on real tokens (-100 would only damp it: V2 logits reach ~116). Every row
    keeps at least its own token, so no row is all -inf."""
    if regions.device.type == "meta":
        return torch.empty(*regions.shape, regions.shape[-1], dtype=dtype, device=regions.device)
    differ = regions.unsqueeze(1) != regions.unsqueeze(2)
    mask = torch.zeros(differ.shape, dtype=dtype, device=regions.device).masked_fill_(differ, MASK_VALUE)
    if padded:
        is_pad = regions == PAD_REGION
        mask.masked_fill_(is_pad.unsqueeze(1) != is_pad.unsqueeze(2), float("-inf"))
    return mask


class RegionMask:
    """A shifted-window (and padding) mask held as region ids (nW, N) instead of the dense (nW, N, N) floats.

    What the attention kernels accept in place of a dense mask: `shape` is the dense shape,
    `rows(sel, dtype)` builds the dense mask of the windows `sel` only, `dense(dtype)` all of them.
    `padded`: ids PAD_REGION are padded tokens, cut off from real ones (:func:`mask_from_regions`).
    """

    __slots__ = ("regions", "padded")

    def __init__(self, regions: torch.Tensor, padded: bool = False):
        if regions.ndim != 2:
            raise ValueError(f"region ids must be (nW, N), got {tuple(regions.shape)}")
        self.regions, self.padded = regions, padded

    @property
    def shape(self) -> torch.Size:
        nW, N = self.regions.shape
        return torch.Size((nW, N, N))

    @property
    def device(self) -> torch.device:
        return self.regions.device

    def rows(self, sel: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mask_from_regions(self.regions.index_select(0, sel), dtype, self.padded)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mask_from_regions(self.regions, dtype, self.padded)

    def masked_windows(self) -> torch.Tensor:
        """(nW,) bool: windows with more than one region (the only ones the mask changes)."""
        return self.regions.amin(1) != self.regions.amax(1)


def shifted_window_mask(H: int, W: int, window_size: int, shift: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Additive mask (nW, N, N) with 0 within a region and -100 across regions.

    Built from the cached region ids (:func:`shifted_window_regions`); nothing dense is cached, the
    caller owns the returned tensor. On the meta device only the shape is produced.
    """
    if shift <= 0:
        raise ValueError(f"shifted_window_mask needs shift > 0, got {shift}")
    device = torch.empty(0).device if device is None else torch.device(device)  # honours `with torch.device(...)`
    n_win, n_tok = (H // window_size) * (W // window_size), window_size * window_size
    if device.type == "meta":
        return torch.empty(n_win, n_tok, n_tok, device=device)
    return mask_from_regions(_window_regions_cpu(H, W, window_size, shift, 0)).to(device)
