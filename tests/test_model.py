"""Model structure against the paper / official code: sizes, keys, init, geometry, config, checkpointing."""
import math

import pytest
import torch

import swinv2
from swinv2 import (PAPER_VARIANTS, SwinTransformerV2, SwinV2Config, VARIANTS, apply_activation_checkpointing, create_model,
                    iter_blocks, param_groups)
from swinv2.attention import relative_coords_table, relative_position_index
from swinv2.model import PatchMerging
from swinv2.windows import cyclic_shift, shifted_window_mask, window_partition, window_reverse


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("variant,millions", [("tiny", 28.35), ("small", 49.73), ("base", 87.92), ("large", 196.74)])
def test_param_counts_match_official(variant, millions):
    with torch.device("meta"):
        model = create_model(variant)
    assert n_params(model) / 1e6 == pytest.approx(millions, rel=5e-4)


@pytest.mark.parametrize("variant,millions", [("huge", 658.0), ("giant", 3000.0)])
def test_huge_giant_on_meta(variant, millions):
    with torch.device("meta"):
        model = create_model(variant)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert n_params(model) / 1e6 == pytest.approx(millions, rel=0.01)
    # paper-only extra LayerNorm every 6 blocks of a stage, under its own non-official key
    keys = model.state_dict().keys()
    extra = sorted(k for k in keys if ".extra_norm." in k)
    n_extra = sum(d // 6 for d in VARIANTS[variant]["depths"])
    assert len(extra) == 2 * n_extra and "layers.2.blocks.5.extra_norm.weight" in keys
    assert "layers.2.blocks.4.extra_norm.weight" not in keys


def test_param_count_independent_of_window():
    with torch.device("meta"):
        a, b = create_model("base", window_size=8), create_model("base", window_size=16)
    assert n_params(a) == n_params(b)


def test_meta_model_materialises_with_correct_buffers():
    with torch.device("meta"):
        meta = create_model("tiny", img_size=64, window_size=4)
    meta.to_empty(device="cpu")
    meta.reset_buffers()
    real = create_model("tiny", img_size=64, window_size=4)
    real_bufs = dict(real.named_buffers())
    for name, buf in meta.named_buffers():
        assert torch.equal(buf, real_bufs[name]), name


# --------------------------------------------------------------------------------------------- keys
@pytest.fixture(scope="module")
def tiny256():
    torch.manual_seed(0)
    return create_model("tiny", img_size=256, window_size=8)


def test_official_keys_and_shapes(tiny256):
    sd = tiny256.state_dict()
    assert len(sd) == 250
    assert len(list(tiny256.parameters())) == 221
    expected = {
        "patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,),
        "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,),
        "layers.0.blocks.1.attn_mask": (64, 64, 64),
        "layers.0.blocks.0.norm1.weight": (96,), "layers.0.blocks.0.norm1.bias": (96,),
        "layers.0.blocks.0.attn.logit_scale": (3, 1, 1),
        "layers.0.blocks.0.attn.q_bias": (96,), "layers.0.blocks.0.attn.v_bias": (96,),
        "layers.0.blocks.0.attn.relative_coords_table": (1, 15, 15, 2),
        "layers.0.blocks.0.attn.relative_position_index": (64, 64),
        "layers.0.blocks.0.attn.cpb_mlp.0.weight": (512, 2), "layers.0.blocks.0.attn.cpb_mlp.0.bias": (512,),
        "layers.0.blocks.0.attn.cpb_mlp.2.weight": (3, 512),
        "layers.0.blocks.0.attn.qkv.weight": (288, 96),
        "layers.0.blocks.0.attn.proj.weight": (96, 96), "layers.0.blocks.0.attn.proj.bias": (96,),
        "layers.0.blocks.0.norm2.weight": (96,), "layers.0.blocks.0.mlp.fc1.weight": (384, 96),
        "layers.0.blocks.0.mlp.fc1.bias": (384,), "layers.0.blocks.0.mlp.fc2.weight": (96, 384),
        "layers.0.downsample.reduction.weight": (192, 384), "layers.0.downsample.norm.weight": (192,),
        "norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["layers.0.blocks.0.attn.relative_coords_table"].dtype == torch.float32
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    for absent in ("layers.0.blocks.0.attn.cpb_mlp.2.bias", "layers.0.blocks.0.attn.qkv.bias",
                   "layers.3.downsample.reduction.weight", "layers.0.blocks.0.attn_mask"):
        assert absent not in sd
    masks = sorted(k for k in sd if k.endswith("attn_mask"))
    assert masks == ["layers.0.blocks.1.attn_mask", "layers.1.blocks.1.attn_mask", "layers.2.blocks.1.attn_mask",
                     "layers.2.blocks.3.attn_mask", "layers.2.blocks.5.attn_mask"]


def test_window_clipping_and_shift():
    with torch.device("meta"):
        m8 = create_model("tiny", window_size=8)
        m16 = create_model("tiny", window_size=16)
    geo = lambda m: [(r.block.window_size, r.block.shift_size) for r in iter_blocks(m)]
    # 256/W8: stages 64,32,16 use W8 (shift 4 on odd blocks); stage 4 (8x8) clipped, no shift
    assert geo(m8) == [(8, 0), (8, 4)] * 2 + [(8, 0), (8, 4)] * 3 + [(8, 0), (8, 0)]
    # 256/W16: stage 3 (16x16) global, no shift; stage 4 window 8
    assert geo(m16) == [(16, 0), (16, 8)] * 2 + [(16, 0)] * 6 + [(8, 0)] * 2
    assert m16.layers[3].blocks[0].attn.relative_coords_table.shape == (1, 15, 15, 2)


@pytest.mark.parametrize("res, window, want", [
    (64, 8, (8, 4)),    # tiles: configured window, half-window shift
    (9, 8, (8, 4)),     # larger than the window: not clipped (validation rejects the non-tiling map)
    (8, 8, (8, 0)),     # exactly the window: one window, no shift
    (4, 8, (4, 0)),     # smaller: the window shrinks to the map, no shift
    (1, 8, (1, 0)),
    (24, 7, (7, 3)),    # odd window: shift floor(7/2)
])
def test_window_geometry_clips_small_stages(res, window, want):
    from swinv2.config import window_geometry

    geo = window_geometry(res, window)
    assert (geo.window, geo.shift) == want
    assert [geo.block_shift(j) for j in range(4)] == [0, want[1], 0, want[1]]


def test_blocks_receive_the_config_geometry():
    # the model builds every block from SwinV2Config.stage_window, including the clipped stages
    cfg = SwinV2Config(img_size=128, window_size=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), embed_dim=16)
    with torch.device("meta"):
        m = SwinTransformerV2(cfg)
    for r in iter_blocks(m):
        geo = cfg.stage_window(r.stage)
        assert (r.block.window_size, r.block.shift_size) == (geo.window, geo.block_shift(r.position)), r.name
        assert r.block.pad == geo.pad == 0, r.name
    assert [cfg.stage_window(i) for i in range(4)] == [(8, 4, 0), (8, 4, 0), (8, 0, 0), (4, 0, 0)]


def test_block_takes_its_window_as_given():
    # no clipping inside the block any more: a window that does not tile its map is an error, not a surprise
    from swinv2.model import SwinTransformerV2Block

    with pytest.raises(ValueError, match="window_geometry"):
        SwinTransformerV2Block(16, (4, 4), 1, window_size=8, shift_size=4)
    with pytest.raises(ValueError, match="shift_size"):
        SwinTransformerV2Block(16, (8, 8), 1, window_size=4, shift_size=4)
    blk = SwinTransformerV2Block(16, (8, 8), 1, window_size=8, shift_size=0)
    assert (blk.window_size, blk.shift_size, blk.attn_mask) == (8, 0, None)


def test_stochastic_depth_is_linear():
    with torch.device("meta"):
        m = create_model("tiny", drop_path_rate=0.3)
    rates = [r.block.drop_path.p for r in iter_blocks(m)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])


# --------------------------------------------------------------------------------------------- init
def test_official_init(tiny256):
    sd = tiny256.state_dict()
    for _, _, _, name, blk in iter_blocks(tiny256):
        for norm in (blk.norm1, blk.norm2):
            assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0, name
        assert torch.allclose(blk.attn.logit_scale, torch.full((blk.num_heads, 1, 1), math.log(10.0)))
        assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.v_bias) == 0
    for key in ("patch_embed.norm.weight", "layers.0.downsample.norm.weight", "norm.weight"):
        assert torch.all(sd[key] == 1), key
    w = sd["layers.2.blocks.0.mlp.fc1.weight"]
    # official trunc_normal_(std=.02) truncates at +-2 (absolute, i.e. 100 std): a plain N(0, .02^2)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and w.abs().max() > 0.06
    assert torch.count_nonzero(sd["layers.2.blocks.0.mlp.fc1.bias"]) == 0
    assert sd["layers.0.blocks.0.attn.cpb_mlp.0.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_res_post_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = create_model("tiny", img_size=64, window_size=4)
    x = torch.randn(2, 16 * 16, 96)
    for blk in model.layers[0].blocks:
        assert torch.equal(blk(x), x)
    # the whole trunk is then patch_embed -> merges -> norm, e.g. stage outputs equal stage inputs
    tokens = model.patch_embed(torch.randn(1, 3, 64, 64))
    assert torch.equal(model.layers[0].forward_blocks(tokens), tokens)


def test_pre_norm_style_is_not_identity_and_norms_are_one():
    torch.manual_seed(0)
    model = create_model("tiny", img_size=64, window_size=4, norm_style="pre", attn_type="dot")
    blk = model.layers[0].blocks[1]
    assert torch.all(blk.norm1.weight == 1) and not hasattr(blk.attn, "logit_scale")
    x = torch.randn(2, 256, 96)
    assert not torch.allclose(blk(x), x)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# --------------------------------------------------------------------------------------------- geometry
def test_relative_coords_table_edges_from_reference():
    log_edge = lambda t: t.abs().max().item()
    assert log_edge(relative_coords_table(8)) == pytest.approx(math.log2(9) / 3, abs=1e-4)  # 1.0566
    assert log_edge(relative_coords_table(12)) == pytest.approx(1.0566, abs=1e-4)
    assert log_edge(relative_coords_table(16, 12)) == pytest.approx(1.191, abs=1e-3)
    assert log_edge(relative_coords_table(24, 12)) == pytest.approx(1.383, abs=1e-3)
    assert log_edge(relative_coords_table(12, 6)) == pytest.approx(1.406, abs=1e-3)
    t = relative_coords_table(3)  # offsets -2..2 normalised by 2: +-1 -> 8 -> log2(9)/3; +-0.5 -> 4 -> log2(5)/3
    assert t.shape == (1, 5, 5, 2)
    assert t[0, :, 0, 0].tolist() == pytest.approx([-math.log2(9) / 3, -math.log2(5) / 3, 0, math.log2(5) / 3,
                                                    math.log2(9) / 3], abs=1e-6)
    assert torch.all(t[0, 0, :, 1] == t[0, 1, :, 1])  # channel 1 varies along the second axis
    assert torch.isfinite(relative_coords_table(1)).all()  # 1x1 window: no 0/0


def test_pretrained_window_sizes_reach_the_blocks():
    m = create_model("tiny", img_size=384, window_size=24, pretrained_window_sizes=(12, 12, 12, 6))
    edges = [b.attn.relative_coords_table.abs().max().item() for b in (m.layers[0].blocks[0], m.layers[3].blocks[0])]
    assert edges == pytest.approx([1.383, 1.406], abs=1e-3)
    assert m.layers[3].blocks[0].window_size == 12


def test_relative_position_index_formula():
    M = 4
    idx = relative_position_index(M)
    assert idx.shape == (16, 16) and idx.dtype == torch.int64
    for i in range(16):
        for j in range(16):
            dy, dx = i // M - j // M, i % M - j % M
            assert idx[i, j] == (dy + M - 1) * (2 * M - 1) + dx + M - 1


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    w = window_partition(x, 4)
    assert w.shape == (8, 4, 4, 3)
    assert torch.equal(w[1], x[0, 0:4, 4:8]) and torch.equal(w[2], x[0, 4:8, 0:4]) and torch.equal(w[4], x[1, :4, :4])
    assert torch.equal(window_reverse(w, 4, 8, 8), x)
    assert torch.equal(cyclic_shift(cyclic_shift(x, 2), -2), x)
    assert torch.equal(cyclic_shift(x, 2)[:, 0, 0], x[:, 2, 2])


@pytest.mark.parametrize("H,ws,shift", [(8, 4, 2), (12, 4, 2), (16, 8, 4), (12, 6, 3)])
def test_shifted_window_mask_blocks_exactly_the_wrapped_pairs(H, ws, shift):
    mask = shifted_window_mask(H, H, ws, shift)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}
    # independent rule: tokens of one shifted window were neighbours in the original image iff their
    # original coordinates ((p + shift) mod H) differ by less than a window on both axes.
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij"), -1)
    orig = (coords + shift) % H
    win = window_partition(orig.unsqueeze(0).float(), ws).view(-1, ws * ws, 2)
    d = (win.unsqueeze(2) - win.unsqueeze(1)).abs()
    allowed = (d < ws).all(-1)
    assert torch.equal(mask == 0, allowed)


def test_patch_merging_order_and_norm_after_reduction():
    H, C = 4, 2
    x = torch.zeros(1, H, H, C)
    for h in range(H):
        for w in range(H):
            x[0, h, w] = 100 * h + w
    pm = PatchMerging((H, H), C)
    seen = {}
    pm.reduction.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    out = pm(x.view(1, H * H, C))
    cat = seen["inp"].view(1, 2, 2, 4 * C)
    for i in range(2):
        for j in range(2):
            parts = cat[0, i, j].view(4, C)[:, 0].tolist()
            assert parts == [100 * (2 * i) + 2 * j, 100 * (2 * i + 1) + 2 * j,
                             100 * (2 * i) + 2 * j + 1, 100 * (2 * i + 1) + 2 * j + 1]
    assert pm.reduction.bias is None and pm.norm.normalized_shape == (2 * C,)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(seen["out"], (2 * C,)))


# --------------------------------------------------------------------------------------------- forward
def test_forward_shapes():
    torch.manual_seed(0)
    m = create_model("tiny", img_size=64, window_size=4, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 7)
    assert m.forward_features(x).shape == (2, 768)
    stages = m.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [(2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2)]
    headless = create_model("tiny", img_size=64, window_size=4, num_classes=0)
    assert headless(x).shape == (2, 768)


def test_input_checks_have_clear_messages():
    m = create_model("tiny", img_size=64, window_size=4)
    with pytest.raises(ValueError, match=r"input size 128x128 does not match the configured img_size 64x64"):
        m(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"expected 3 input channels \(in_chans\), got 1"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="does not match"):
        m(torch.randn(1, 3, 64, 48))


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(img_size=250), r"img_size: 250 is not divisible by patch_size 4"),
    (dict(img_size=224, window_size=8), r"window_size: stage 1 resolution 28 .*divisible"),
    (dict(img_size=1536, window_size=32), r"window_size: stage 3 resolution 48"),
    (dict(img_size=1280, window_size=24), r"window_size: stage 0 resolution 320"),
    (dict(img_size=72), r"img_size: 72: patch grid 18 must be divisible by 8"),
    (dict(depths=(2, 2, 6)), r"num_heads: has 4 entries but depths has 3"),
    (dict(pretrained_window_sizes=(0, 0, 0)), r"pretrained_window_sizes: has 3 entries"),
    (dict(num_heads=(3, 6, 12, 25)), r"num_heads: stage 3 dim 768 is not divisible by 25 heads"),
    (dict(attention="flash"), r"attention: unknown attention kernel 'flash'; valid: reference, fused, sequential"),
    (dict(norm_style="post"), r"norm_style: .*res_post, pre"),
    (dict(attn_type="linear"), r"attn_type: .*cosine, dot"),
    (dict(drop_path_rate=1.0), r"drop_path_rate"),
])
def test_config_validation_names_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SwinV2Config(**kwargs)


def test_config_accepts_official_geometries_and_lists():
    for img, win in [(256, 8), (256, 16), (192, 12), (384, 24), (224, 7), (1536, 24), (1536, 16), (640, 20), (896, 28)]:
        SwinV2Config(img_size=img, window_size=win)
    cfg = SwinV2Config(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], pretrained_window_sizes=[12, 12, 12, 6])
    assert cfg.depths == (2, 2, 6, 2) and isinstance(cfg.pretrained_window_sizes, tuple)


def test_unknown_variant_and_override():
    with pytest.raises(ValueError, match=r"variant: unknown variant 'medium'; valid variants: tiny, small, base, "
                                         r"large, huge, giant"):
        create_model("medium")
    with pytest.raises(ValueError, match="windowsize"):
        create_model("tiny", windowsize=8)


def test_variant_table():
    paper = {k: v for k, v in VARIANTS.items() if k in PAPER_VARIANTS}
    assert {k: (v["embed_dim"], v["depths"], v["num_heads"]) for k, v in paper.items()} == {
        "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
        "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)), "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
        "huge": (352, (2, 2, 18, 2), (11, 22, 44, 88)), "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128))}
    for name, v in VARIANTS.items():
        assert all(v["embed_dim"] * 2**i // h == 32 for i, h in enumerate(v["num_heads"])), name
    assert VARIANTS["huge"]["extra_norm_every"] == VARIANTS["giant"]["extra_norm_every"] == 6
    # the one entry beyond the paper: the trainer's embedded default, 1.44M parameters at 10 classes
    assert set(VARIANTS) - set(PAPER_VARIANTS) == {"toy"}
    assert sum(p.numel() for p in create_model("toy", img_size=32, window_size=4, num_classes=10).parameters()) \
        == pytest.approx(1.44e6, rel=0.01)


# --------------------------------------------------------------------------------------------- optimiser groups
def test_param_groups_official_exclusions(tiny256):
    decay, no_decay = param_groups(tiny256, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny256.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d.isdisjoint(nd) and len(d) + len(nd) == 221
    for n in ("layers.0.blocks.0.attn.cpb_mlp.0.weight", "layers.0.blocks.0.attn.cpb_mlp.2.weight",
              "layers.0.blocks.0.attn.logit_scale", "layers.0.blocks.0.attn.q_bias", "layers.0.blocks.0.norm1.weight",
              "head.bias", "patch_embed.proj.bias", "norm.weight"):
        assert n in nd, n
    for n in ("layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.attn.proj.weight", "head.weight",
              "layers.0.downsample.reduction.weight", "patch_embed.proj.weight", "layers.0.blocks.0.mlp.fc1.weight"):
        assert n in d, n


def test_iter_blocks_order():
    with torch.device("meta"):
        m = create_model("tiny")
    got = [(r.index, r.stage, r.position, r.name) for r in iter_blocks(m)]
    assert [g[0] for g in got] == list(range(12))
    assert got[2] == (2, 1, 0, "layers.1.blocks.0") and got[-1] == (11, 3, 1, "layers.3.blocks.1")
    assert [g[1] for g in got] == [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    assert [g[2] for g in got] == [0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 0, 1]
    # the indices address the block they come with (not just a counter beside it)
    assert all(r.block is m.layers[r.stage].blocks[r.position] for r in iter_blocks(m))
    assert all(m.get_submodule(r.name) is r.block for r in iter_blocks(m))


# --------------------------------------------------------------------------------------------- checkpointing
def test_activation_checkpointing_same_outputs_grads_and_keys():
    torch.manual_seed(0)
    cfg = dict(img_size=64, window_size=4, drop_path_rate=0.2, attention="sequential", sequential_chunk=3,
               embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    plain = create_model("tiny", **cfg)
    with torch.no_grad():  # non-identity blocks, so recomputation is actually exercised
        for n, p in plain.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.fill_(0.7)
    ckpt = create_model("tiny", **cfg)
    ckpt.load_state_dict(plain.state_dict())
    keys_before = list(ckpt.state_dict().keys())
    assert apply_activation_checkpointing(ckpt) == 8
    assert apply_activation_checkpointing(ckpt) == 0  # idempotent
    assert list(ckpt.state_dict().keys()) == keys_before
    plain.train(), ckpt.train()  # drop path active: the RNG must be replayed on recompute
    x = torch.randn(2, 3, 64, 64)
    results = []
    for m in (plain, ckpt):
        torch.manual_seed(7)
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_activation_checkpointing_every_and_stages():
    with torch.device("meta"):
        m = create_model("tiny")
    assert apply_activation_checkpointing(m, every=2, stages=[2]) == 3  # blocks 4, 6, 8 (stage 2 = 4..9)
    flagged = [r.index for r in iter_blocks(m) if swinv2.checkpointing.is_checkpointed(r.block)]
    assert flagged == [4, 6, 8]
    assert swinv2.remove_activation_checkpointing(m) == 3
    with pytest.raises(ValueError, match="stages"):
        apply_activation_checkpointing(m, stages=[4])


def test_activation_checkpointing_actually_recomputes():
    calls = []
    m = create_model("tiny", img_size=64, window_size=4)
    m.layers[0].blocks[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    apply_activation_checkpointing(m, stages=[0])
    m(torch.randn(1, 3, 64, 64)).sum().backward()
    assert len(calls) == 2  # forward + recompute in backward


# --------------------------------------------------------------------------------------------- 1536 x 1536
_BIG_SCRIPT = r"""
import json, resource, sys, time
import torch
import swinv2
torch.manual_seed(0)
t0 = time.time()
model = swinv2.create_model("tiny", img_size=1536, window_size=24, attention="sequential", sequential_chunk=16)
with torch.no_grad():  # zero-init post-norms would stop every gradient into attention: use trained-like values
    for blk in (ref.block for ref in swinv2.iter_blocks(model)):
        blk.norm1.weight.fill_(0.5), blk.norm2.weight.fill_(0.5)
wrapped = swinv2.apply_activation_checkpointing(model, stages=[0, 1]) if sys.argv[1] == "1" else 0
x = torch.randn(1, 3, 1536, 1536)
t1 = time.time()
out = model(x)
t2 = time.time()
out.float().logsumexp(-1).sum().backward()
t3 = time.time()
grads = [p.grad for p in model.parameters()]
print(json.dumps(dict(
    build_s=t1 - t0, forward_s=t2 - t1, backward_s=t3 - t2, wrapped=wrapped,
    peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    out_finite=bool(torch.isfinite(out).all()), missing_grads=sum(g is None for g in grads),
    grads_finite=all(bool(torch.isfinite(g).all()) for g in grads if g is not None),
    cpb_grad=float(model.layers[0].blocks[1].attn.cpb_mlp[0].weight.grad.abs().sum()))))
"""


@pytest.mark.slow
def test_tiny_1536_window24_sequential_forward_backward(report):
    """SwinV2-T at 1536x1536/W24 (stage 1: 256 windows of 576 tokens), batch 1, forward+backward with the
    sequential kernel and activation checkpointing on stages 1-2; own process so peak RSS is its own."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BIG_SCRIPT, "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    report(f"1536x1536 W24 tiny sequential: build {r['build_s']:.1f}s forward {r['forward_s']:.1f}s "
           f"backward {r['backward_s']:.1f}s peak RSS {r['peak_rss_gb']:.2f} GiB")
    assert r["wrapped"] == 4
    assert r["out_finite"] and r["grads_finite"] and r["missing_grads"] == 0
    assert r["cpb_grad"] > 0
    assert r["peak_rss_gb"] < 12
