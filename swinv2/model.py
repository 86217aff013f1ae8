"""SwinV2 network: blocks (res-post-norm), stages, patch merging, patch embedding, head.

Module names follow the official `models/swin_transformer_v2.py`, so `state_dict()` is the official
checkpoint format. One addition (paper only, H/G): `layers.{i}.blocks.{j}.extra_norm`, a LayerNorm on
the main branch at the end of every `extra_norm_every`-th block of a stage; no official key collides.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import WindowAttention
from .config import DEFAULTS, VARIANTS, SwinV2Config, WindowGeometry
from .optim_groups import no_weight_decay, param_groups  # noqa: F401  (re-exported: the model's API)
from .windows import (RegionMask, mask_from_regions, shifted_window_partition, shifted_window_reverse,
                      window_regions)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # the 1/keep scaling on the (B, 1, ...) mask, then ONE multiply over x (timm's drop_path):
        # x * mask / keep was two passes over the branch forward and two more backward
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _check_window(resolution: tuple[int, int], window_size: int, shift_size: int, pad: int) -> None:
    # The block takes its window as given (clipping and padding are config.window_geometry's job):
    # say what is wrong here rather than fail later inside window_partition.
    H, W = resolution
    if not 0 <= pad < max(window_size, 1):
        raise ValueError(f"pad must be in [0, window_size), got {pad} for window {window_size}")
    if window_size < 1 or (H + pad) % window_size or (W + pad) % window_size:
        raise ValueError(f"window_size {window_size} does not tile the {H}x{W} map padded by {pad}; use "
                         "swinv2.config.window_geometry(resolution, window, pad_to_window) for a stage's geometry")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")


class SwinTransformerV2Block(nn.Module):
    """(S)W-MSA + MLP block. norm_style "res_post" (V2): x + DropPath(LN(f(x))); "pre" (V1): x + DropPath(f(LN(x))).

    `window_size` / `shift_size` are the effective ones (already clipped to the map, see
    :func:`swinv2.config.window_geometry`); `pad` tokens are added at the bottom/right of the map for
    attention (so the window tiles it), masked out of it and cropped after (official detection style)."""

    # A block on its own (tests, studies) takes the model's defaults: SwinV2Config's, stated there only.
    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size: int = DEFAULTS.window_size, shift_size: int = 0, mlp_ratio: float = DEFAULTS.mlp_ratio,
                 qkv_bias: bool = DEFAULTS.qkv_bias, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pretrained_window_size: int = 0, norm_style: str = DEFAULTS.norm_style,
                 attn_type: str = DEFAULTS.attn_type, attention: str = DEFAULTS.attention,
                 sequential_chunk: int = DEFAULTS.sequential_chunk, extra_norm: bool = False, pad: int = 0):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        self.mlp_ratio, self.norm_style = mlp_ratio, norm_style
        _check_window(self.input_resolution, window_size, shift_size, pad)
        self.window_size, self.shift_size, self.pad = window_size, shift_size, pad

        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, pretrained_window_size=pretrained_window_size,
                                    attn_type=attn_type, kernel=attention, sequential_chunk=sequential_chunk)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.extra_norm = nn.LayerNorm(dim) if extra_norm else None
        # The shift mask is kept compact: region ids (nW, N) int8 in a NON-persistent buffer (moves with
        # .to(), not in state_dict). The official persistent entry layers.i.blocks.j.attn_mask (nW, N, N)
        # float is still produced by state_dict() and accepted (validated) by load_state_dict(), see
        # _save_to_state_dict / _load_from_state_dict. At 1536/W24 the dense stage-1 mask is 340 MB.
        # With padding the ids also mark the padded tokens (the key exists only where the official
        # one does: shifted blocks), so padding changes no state-dict key.
        H, W = self.input_resolution
        self.register_buffer("attn_mask_regions", window_regions(H, W, window_size, shift_size, pad), persistent=False)

    @property
    def attn_mask(self) -> Optional[torch.Tensor]:
        """The dense additive mask (nW, N, N) float32 the block attends with (shift and padding; the
        official one when unpadded), or None when there is none. Built on every access from the region
        ids (not kept): use it for inspection, not in a loop."""
        return None if self.attn_mask_regions is None else mask_from_regions(self.attn_mask_regions, padded=self.pad > 0)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.shift_size > 0:  # same position as the official buffer: before the children
            destination[prefix + "attn_mask"] = self.attn_mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "attn_mask"
        if self.shift_size > 0:
            if key in state_dict:
                msg = self._check_loaded_mask(state_dict.pop(key))
                if msg:
                    error_msgs.append(f"{key}: {msg}")
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _check_loaded_mask(self, value: torch.Tensor) -> str:
        """'' if `value` is this block's shift mask, else why not (compared window chunk by chunk)."""
        regions = self.attn_mask_regions
        nW, N = regions.shape
        if tuple(value.shape) != (nW, N, N):
            return (f"size mismatch: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {(nW, N, N)}.")
        if value.device.type == "meta" or regions.device.type == "meta":
            return ""
        step = max(1, (16 << 20) // (N * N * 4))
        for lo in range(0, nW, step):
            want = mask_from_regions(regions[lo:lo + step].cpu(), padded=self.pad > 0)
            if not torch.equal(value[lo:lo + step].to("cpu", torch.float32), want):
                return ("values differ from the shifted-window mask of this geometry; the model rebuilds the "
                        "mask from its geometry and cannot hold another one")
        return ""

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.attn.reset_buffers()
        if self.attn_mask_regions is not None and self.attn_mask_regions.device.type != "meta":
            H, W = self.input_resolution
            self.attn_mask_regions.copy_(window_regions(H, W, self.window_size, self.shift_size, self.pad, device="cpu"))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, _, C = x.shape
        ws, pad = self.window_size, self.pad
        x = x.view(B, H, W, C)
        if pad:  # bottom/right, BEFORE the roll (official detection order); the mask cuts these tokens off
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        # roll + partition (and partition reverse + roll back) as one token gather each (windows.py)
        windows = shifted_window_partition(x, ws, self.shift_size)
        mask = None if self.attn_mask_regions is None else RegionMask(self.attn_mask_regions, padded=pad > 0)
        windows = self.attn(windows, mask=mask)
        x = shifted_window_reverse(windows, ws, H + pad, W + pad, self.shift_size)
        if pad:
            x = x[:, :H, :W]
        return x.reshape(B, H * W, C)

    def check_input(self, x: torch.Tensor) -> None:
        H, W = self.input_resolution
        if x.ndim != 3 or x.shape[1] != H * W or x.shape[2] != self.dim:
            raise ValueError(f"block expects (B, {H * W}, {self.dim}) tokens, got {tuple(x.shape)}")

    def forward_attention_half(self, x: torch.Tensor) -> torch.Tensor:
        """x + DropPath(attention branch): the first residual step of forward()."""
        if self.norm_style == "res_post":
            return x + self.drop_path(self.norm1(self._attention(x)))
        return x + self.drop_path(self._attention(self.norm1(x)))

    def forward_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """x + DropPath(MLP branch), then extra_norm if any: the rest of forward()."""
        if self.norm_style == "res_post":
            x = x + self.drop_path(self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.extra_norm is not None:
            x = self.extra_norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_mlp_half(self.forward_attention_half(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, shift_size={self.shift_size}, "
                + (f"pad={self.pad}, " if self.pad else "") + f"norm_style={self.norm_style}")


class PatchMerging(nn.Module):
    """V2 merging: 2x2 neighbourhood concat (4C) -> Linear(4C, 2C, no bias) -> LayerNorm(2C) (norm after)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int):
        super().__init__()
        self.input_resolution, self.dim = tuple(input_resolution), dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        # the official cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        # as one permuted copy: row/column parity (a, c) of a 2x2 neighbour goes to slot 2c + a. Same
        # values; the backward is one copy too (the four slices' was four zero-filled tensors and adds)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, -1, 4 * C)
        return self.norm(self.reduction(x))


class PatchEmbed(nn.Module):
    """Conv(in_chans, C, p, stride p) + LayerNorm, with clear errors for wrong input geometry."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans, self.embed_dim = img_size, patch_size, in_chans, embed_dim
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels (in_chans), got {C} (input shape {tuple(x.shape)})")
        if (H, W) != (self.img_size, self.img_size):
            raise ValueError(
                f"input size {H}x{W} does not match the configured img_size {self.img_size}x{self.img_size}; "
                f"the model (window masks, stage resolutions) is built for one resolution: resize the input "
                f"or create the model with img_size={H}" + ("" if H == W else " (square inputs only)"))
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class BasicLayer(nn.Module):
    """One stage: `blocks`, then (official layout) this stage's `downsample` at its end.

    `geometry` is the stage's effective window and shift (:func:`swinv2.config.window_geometry`);
    the odd blocks get the shift."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 geometry: WindowGeometry, *, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float] | float, downsample: bool, pretrained_window_size: int,
                 norm_style: str, attn_type: str, attention: str, sequential_chunk: int, extra_norm_every: int):
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        dp = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            SwinTransformerV2Block(
                dim, input_resolution, num_heads, window_size=geometry.window,
                shift_size=geometry.block_shift(j), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop, attn_drop=attn_drop, drop_path=dp[j], pretrained_window_size=pretrained_window_size,
                norm_style=norm_style, attn_type=attn_type, attention=attention, sequential_chunk=sequential_chunk,
                extra_norm=extra_norm_every > 0 and (j + 1) % extra_norm_every == 0, pad=geometry.pad)
            for j in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x

    @torch.no_grad()
    def init_respostnorm(self) -> None:
        # Official detail (not in the paper): zero the post-norms so every block starts as the identity.
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)


class SwinTransformerV2(nn.Module):
    def __init__(self, config: SwinV2Config):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.num_classes, self.num_layers, self.embed_dim = c.num_classes, c.num_stages, c.embed_dim
        self.num_features = c.num_features
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.pos_drop = nn.Dropout(c.drop_rate)
        dpr = torch.linspace(0, c.drop_path_rate, sum(c.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(c.num_stages):
            res = c.stage_resolution(i)
            start = sum(c.depths[:i])
            self.layers.append(BasicLayer(
                c.stage_dim(i), (res, res), c.depths[i], c.num_heads[i], c.stage_window(i), mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias, drop=c.drop_rate, attn_drop=c.attn_drop_rate,
                drop_path=dpr[start:start + c.depths[i]], downsample=i < c.num_stages - 1,
                pretrained_window_size=c.pretrained_window_sizes[i], norm_style=c.norm_style, attn_type=c.attn_type,
                attention=c.attention, sequential_chunk=c.sequential_chunk, extra_norm_every=c.extra_norm_every))
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: Linear trunc_normal(.02) / bias 0, LayerNorm 1/0, then res-post zero norms.

        Works on the meta device (init ops are shape-only there).
        """
        def _init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_init)
        if self.config.norm_style == "res_post":
            for layer in self.layers:
                layer.init_respostnorm()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute every geometry buffer (coords tables, indices, masks), e.g. after
        `model.to_empty(device=...)` of a model built on the meta device."""
        for ref in iter_blocks(self):
            ref.block.reset_buffers()

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs (before each stage's downsample) as (B, C_i, H_i, W_i) maps for dense tasks."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for layer in self.layers:
            x = layer.forward_blocks(x)
            H, W = layer.input_resolution
            outs.append(x.transpose(1, 2).reshape(x.shape[0], layer.dim, H, W))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised tokens (B, L, 8C)."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 8C)."""
        return self.avgpool(self.forward_tokens(x).transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class BlockRef(NamedTuple):
    """One block of the model, as :func:`iter_blocks` yields it."""

    index: int  # 0..sum(depths)-1 in forward order: the block index of probes and metrics
    stage: int  # i of model.layers[i]
    position: int  # j of model.layers[i].blocks[j]
    name: str  # "layers.{i}.blocks.{j}", the module's qualified name
    block: SwinTransformerV2Block


def iter_blocks(model: nn.Module) -> Iterator[BlockRef]:
    """Every block in forward order with its indices (callers never parse them out of `name`)."""
    index = 0
    for stage, layer in enumerate(model.layers):
        for position, block in enumerate(layer.blocks):
            yield BlockRef(index, stage, position, f"layers.{stage}.blocks.{position}", block)
            index += 1


def create_model(variant: str, img_size: int = 256, window_size: int = 8, num_classes: int = 1000,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), attention: str = "reference",
                 drop_path_rate: float = 0.1, **config_overrides: Any) -> SwinTransformerV2:
    """Build a paper variant (tiny/small/base/large/huge/giant). Works under `with torch.device("meta")`."""
    config = SwinV2Config.from_variant(
        variant, img_size=img_size, window_size=window_size, num_classes=num_classes,
        pretrained_window_sizes=tuple(pretrained_window_sizes), attention=attention,
        drop_path_rate=drop_path_rate, **config_overrides)
    return SwinTransformerV2(config)


__all__ = ["DropPath", "Mlp", "SwinTransformerV2Block", "PatchMerging", "PatchEmbed", "BasicLayer",
           "SwinTransformerV2", "BlockRef", "iter_blocks", "param_groups", "no_weight_decay", "create_model", "VARIANTS"]
