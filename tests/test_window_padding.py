"""pad_to_window: a stage map the window does not tile is padded (bottom/right) to a multiple of it,
attended with the padded tokens masked out, and cropped back (the official detection backbone's
approach, e.g. the paper's W32 at 1536^2). Off by default: the official classifier."""
import os

import pytest
import torch
import torch.nn.functional as F

import swinv2
from swinv2 import SwinTransformerV2, SwinV2Config, window_geometry
from swinv2.model import SwinTransformerV2Block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 160px, patch 4: stages 40, 20, 10, 5. Window 6 pads 40 -> 42, 20 -> 24, 10 -> 12; stage 4 (5) is clipped.
SMALL = dict(img_size=160, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=6,
             drop_path_rate=0.0, num_classes=5)


@pytest.mark.parametrize("res, window, pad_on, want", [
    (48, 32, True, (32, 16, 16)),   # the paper's 1536/W32 stage 4: padded to 64, 2x2 windows, shifted
    (48, 32, False, (32, 16, 0)),   # off: today's rule (validation rejects the non-tiling map)
    (64, 32, True, (32, 16, 0)),    # already tiles: nothing to pad
    (24, 32, True, (24, 0, 0)),     # no larger than the window: still one clipped window, no shift
    (40, 6, True, (6, 3, 2)),
])
def test_window_geometry_pads_only_non_tiling_large_maps(res, window, pad_on, want):
    geo = window_geometry(res, window, pad_on)
    assert geo == want
    assert geo.padded(res) % geo.window == 0 or not pad_on


def test_paper_1536_w32_geometry_and_validation():
    cfg = SwinV2Config.from_variant("giant", img_size=1536, window_size=32, pad_to_window=True)
    assert [cfg.stage_window(i) for i in range(4)] == [(32, 16, 0), (32, 16, 0), (32, 16, 0), (32, 16, 16)]
    with pytest.raises(ValueError, match=r"^window_size: .*pad_to_window"):
        SwinV2Config.from_variant("giant", img_size=1536, window_size=32)


def _pair(**kw):
    torch.manual_seed(0)
    a = SwinTransformerV2(SwinV2Config(**kw))
    with torch.no_grad():  # generic weights: the official init zeroes the res-post norms (identity blocks)
        for name, p in a.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return a


def test_padding_on_a_tiling_size_changes_nothing():
    cfg = dict(SMALL, img_size=192)  # 48, 24, 12, 6: window 6 tiles every stage
    plain = _pair(**cfg)
    padded = SwinTransformerV2(SwinV2Config(**cfg, pad_to_window=True))
    padded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 192, 192)
    assert all(r.block.pad == 0 for r in swinv2.iter_blocks(padded))
    assert torch.equal(padded(x), plain(x))


def _region_of(i: int, side: int, window: int, shift: int) -> int:
    # official slices of the (padded) shifted map: [0, side - window), [side - window, side - shift), rest
    if shift == 0 or i < side - window:
        return 0
    return 1 if i < side - shift else 2


def _explicit_attention(blk, x, pad_fill):
    """The block's attention branch, written per window and per query: each real query attends over
    the real keys of its window that share its region ONLY (the padded tokens are not keys at all),
    with `pad_fill` written into the padded area."""
    B, L, C = x.shape
    H, W = blk.input_resolution
    ws, s, pad = blk.window_size, blk.shift_size, blk.pad
    Hp, Wp = H + pad, W + pad
    xp = pad_fill.clone()
    xp[:, :H, :W] = x.view(B, H, W, C)
    a = blk.attn
    qkv_bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias), a.v_bias))
    qkv = F.linear(xp, a.qkv.weight, qkv_bias).view(B, Hp, Wp, 3, a.num_heads, C // a.num_heads)
    q, k, v = qkv.unbind(3)  # (B, Hp, Wp, nH, hd), unshifted positions
    q, k = F.normalize(q, dim=-1) * a.logit_scale_value().view(1, 1, 1, -1, 1), F.normalize(k, dim=-1)
    bias = a.position_bias()  # (nH, N, N) over window-local token pairs
    out = torch.zeros(B, H, W, C)
    for wy in range(0, Hp, ws):  # windows in shifted coordinates: shifted (y, x) came from (y + s, x + s)
        for wx in range(0, Wp, ws):
            local = [(y, xx) for y in range(wy, wy + ws) for xx in range(wx, wx + ws)]
            orig = [((y + s) % Hp, (xx + s) % Wp) for y, xx in local]
            region = [(_region_of(y, Hp, ws, s), _region_of(xx, Wp, ws, s)) for y, xx in local]
            for i, (oy, ox) in enumerate(orig):
                if oy >= H or ox >= W:
                    continue  # a padded query: cropped away
                keys = [j for j, (ky, kx) in enumerate(orig) if ky < H and kx < W and region[j] == region[i]]
                ks = torch.stack([k[:, orig[j][0], orig[j][1]] for j in keys], 2)  # (B, nH, n, hd)
                vs = torch.stack([v[:, orig[j][0], orig[j][1]] for j in keys], 2)
                logits = (q[:, oy, ox].unsqueeze(2) * ks).sum(-1) + bias[:, i, keys]
                o = (logits.softmax(-1).unsqueeze(-1) * vs).sum(2)  # (B, nH, hd)
                out[:, oy, ox] = o.reshape(B, C)
    return a.proj(out).view(B, L, C)


@pytest.mark.parametrize("stage, block", [(1, 0), (1, 1), (2, 1)])  # 20 -> 24 unshifted / shifted; 10 -> 12
def test_padded_block_equals_attention_over_real_keys_only(stage, block):
    model = _pair(**SMALL, pad_to_window=True)
    blk = model.layers[stage].blocks[block]
    assert blk.pad > 0 and blk.shift_size == (3 if block else 0)
    H, W = blk.input_resolution
    x = torch.randn(2, H * W, blk.dim)
    with torch.no_grad():
        got = blk._attention(x)
        for fill in (torch.zeros(2, H + blk.pad, W + blk.pad, blk.dim),
                     torch.randn(2, H + blk.pad, W + blk.pad, blk.dim) * 100):  # what the pad holds does not matter
            torch.testing.assert_close(got, _explicit_attention(blk, x, fill), atol=2e-5, rtol=1e-4)


def test_padded_model_forward_backward_and_state_dict_keys():
    padded = _pair(**SMALL, pad_to_window=True)
    assert [[b.pad for b in layer.blocks] for layer in padded.layers] == [[2, 2], [4, 4], [2, 2], [0, 0]]
    # the same architecture at a size that tiles: the keys are the official ones, padding adds none
    tiling = SwinTransformerV2(SwinV2Config(**dict(SMALL, img_size=192)))
    sd = padded.state_dict()
    assert list(sd) == list(tiling.state_dict())
    assert [k for k in sd if k.endswith("attn_mask")] == [f"layers.{i}.blocks.1.attn_mask" for i in range(3)]
    # a round trip and an official-format load (window buffers rebuilt) both work strictly
    fresh = SwinTransformerV2(SwinV2Config(**SMALL, pad_to_window=True))
    fresh.load_state_dict(sd)
    report = swinv2.load_official_state_dict(fresh, tiling.state_dict())  # strict: raises on any key mismatch
    assert not report.missing and not report.unexpected
    assert torch.equal(fresh.layers[1].blocks[1].attn.qkv.weight, tiling.layers[1].blocks[1].attn.qkv.weight)
    x = torch.randn(2, 3, 160, 160, requires_grad=True)
    out = padded(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in padded.parameters() if p.grad is not None)


def test_giant_1536_w32_recipe_builds_on_meta():
    from hydra import compose, initialize_config_dir

    import swinv2_train.config as C

    from swinv2_train.spec import resolve_spec

    shards = ["data.train_shards='/d/train-{000000..000099}.tar'", "data.val_shards='/d/val-{000000..000004}.tar'"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=swinv2_giant_1536_w32", *shards])
    resolve_spec(cfg, world_size=8, resolve_data=False)  # the whole recipe validates
    mcfg = C.model_config(cfg.model, cfg.data.num_classes)
    assert (mcfg.img_size, mcfg.window_size, mcfg.pad_to_window) == (1536, 32, True)
    with torch.device("meta"):
        model = SwinTransformerV2(mcfg)
    last = model.layers[3].blocks[1]
    assert (last.window_size, last.shift_size, last.pad) == (32, 16, 16)
    assert last.attn_mask_regions.shape == (4, 32 * 32)
    assert sum(p.numel() for p in model.parameters()) > 2.5e9
