"""Transform, mixup and config semantics."""
import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2_train.data import DataConfig, build_mixup
from swinv2_train.data.mixup import Mixup
from swinv2_train.data.transforms import (EvalTransform, RandAugment, TrainTransform, build_transform,
                                   parse_rand_augment, random_erase, rrc_params, _RAND_OPS, _op)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def encode(arr, fmt="PNG", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def denorm(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def unit(out):
    """A worker transform's (uint8 pixels, erase box) -> pixels in [0, 1]."""
    return out[0].float() / 255


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)


def test_train_transform_shape_range_determinism(photo):
    tf = build_transform(DataConfig(augment="imagenet").resolved(), 32, train=True)
    data = encode(photo)
    (a, ea), (b, eb) = tf(data, random.Random(5)), tf(data, random.Random(5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8  # workers hand over 1 byte a pixel
    assert torch.equal(a, b) and ea == eb and len(ea) == 5
    assert not torch.equal(a, tf(data, random.Random(6))[0])
    ref = build_transform(DataConfig(augment="imagenet").resolved(), 32, train=True, reference=True)
    x = ref(data, random.Random(5))
    # the reference: a normalised [0,1] image, or N(0,1) noise where erased
    assert x.dtype == torch.float32 and x.abs().max() < 8


def test_hflip_really_flips(photo):
    data = encode(photo)
    kw = dict(scale=(0.3, 1.0), rand_augment="", reprob=0.0)
    flipped = TrainTransform(32, hflip=1.0, **kw)(data, random.Random(1))
    plain = TrainTransform(32, hflip=0.0, **kw)(data, random.Random(1))
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert not torch.equal(flipped[0], plain[0])


def test_rrc_area_and_ratio_within_bounds():
    rng = random.Random(0)
    for W, H in ((500, 375), (64, 64), (40, 300)):
        for _ in range(300):
            top, left, h, w = rrc_params(W, H, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
            frac = w * h / (W * H)
            if (W, H) != (40, 300):  # extreme aspect may use the centre-crop fallback
                # rounding w, h to ints moves the area by < 1 px per side
                slack = (w + h + 1) / (W * H)
                assert 0.08 - slack <= frac <= 1.0
                assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_rrc_crop_content_matches_box():
    # crop of a horizontal gradient at scale 1 must span the full gradient
    arr = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    tf = TrainTransform(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    x = unit(tf(encode(arr), random.Random(0)))
    assert x[0, :, 0].mean() < 0.05 and x[0, :, -1].mean() > 0.95


def test_jpeg_draft_close_to_full_decode():
    rng = np.random.default_rng(1)
    low = rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(low).resize((1600, 1200), Image.BICUBIC))
    data = encode(big, "JPEG", quality=92)
    for train in (True, False):
        cls = TrainTransform if train else EvalTransform
        kw = dict(scale=(0.5, 1.0)) if train else {}
        a = cls(64, draft=True, **kw)(data, random.Random(3))
        b = cls(64, draft=False, **kw)(data, random.Random(3))
        assert (unit(a) - unit(b)).abs().mean() < 0.02


def test_eval_crop_vs_resize(photo):
    data = encode(photo)
    assert EvalTransform(32)(data)[0].shape == (3, 32, 32)
    assert EvalTransform(384)(data)[0].shape == (3, 384, 384)
    # test_crop=None: crop below 384 (resize short side to int(S/0.875) then centre crop)
    e = EvalTransform(224)
    assert e.crop and e.resize == 256
    assert not EvalTransform(384).crop and EvalTransform(384, test_crop=True).crop
    # centre crop keeps the centre: a bright border is cut away, a no-crop resize keeps it
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[:, :4] = 255  # 4/256 of the width: inside the 2/36 that the 32/36 centre crop drops
    cropped = unit(EvalTransform(32, test_crop=True)(encode(arr)))
    resized = unit(EvalTransform(32, test_crop=False)(encode(arr)))
    assert cropped[:, :, 0].mean() < 0.05 and resized[:, :, 0].mean() > 0.3  # 4/256 of 32 px: half a column


def test_rand_augment_parse_and_ops(photo):
    a = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert a["m"] == 9 and a["mstd"] == 0.5 and a["inc"] and a["n"] == 2 and a["p"] == 0.5
    with pytest.raises(ValueError):
        parse_rand_augment("auto-m9")
    img = Image.fromarray(photo)
    hp = dict(fill=(124, 116, 104), interp=Image.BICUBIC, translate_pct=0.45)
    for name in _RAND_OPS:
        for inc in (True, False):
            for level in (0.0, 5.0, 10.0):
                out = _op(name, inc)(img, level, random.Random(0), hp)
                assert out.size == img.size and out.mode == "RGB"
    # increasing ops: stronger magnitude changes the image more (rotation as example)
    smooth = np.asarray(Image.fromarray(photo[:6, :8]).resize((80, 60), Image.BICUBIC))
    rot = _op("Rotate", True)
    d = lambda lvl: np.abs(np.asarray(rot(Image.fromarray(smooth), lvl, random.Random(0), hp),  # noqa
                                      float) - smooth).mean()
    assert d(0) < 1e-6 < d(3) < d(9)
    ra = RandAugment("rand-m9-mstd0.5-inc1", fill=(124, 116, 104))
    outs = [np.asarray(ra(img, random.Random(s))) for s in range(20)]
    assert sum(not np.array_equal(o, photo) for o in outs) >= 10  # ~75% of draws change it
    assert np.array_equal(np.asarray(ra(img, random.Random(3))), outs[3])


def test_colour_jitter_only_without_randaugment():
    c = DataConfig(augment="imagenet").resolved()
    assert build_transform(c, 32, True).cj == 0.0  # timm: jitter off when RandAugment is on
    c = DataConfig(augment="imagenet", force_color_jitter=True).resolved()
    assert build_transform(c, 32, True).cj == 0.4
    c = DataConfig(augment="imagenet", rand_augment="").resolved()
    assert build_transform(c, 32, True).cj == 0.4


def test_random_erasing_pixel_mode():
    x = torch.zeros(3, 64, 64)
    erased = random_erase(x.clone(), 1.0, random.Random(0))
    changed = (erased != 0).any(0)
    frac = changed.float().mean().item()
    assert 0.015 < frac < 0.34
    vals = erased[:, changed]
    assert abs(vals.mean().item()) < 0.2 and 0.8 < vals.std().item() < 1.2  # per-pixel N(0,1)
    assert torch.equal(random_erase(x.clone(), 0.0, random.Random(0)), x)


def test_mixup_targets_and_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8) % 5
    mx = Mixup(5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    xm, t = mx(x, y, g)
    lam = mx.last_lam
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    off = 0.1 / 5
    expect = (torch.full((8, 5), off).scatter(1, y[:, None], 1 - 0.1 + off) * lam
              + torch.full((8, 5), off).scatter(1, y.flip(0)[:, None], 1 - 0.1 + off) * (1 - lam))
    assert torch.allclose(t, expect)
    # cutmix: lam equals the fraction of pixels kept from the original sample
    cm = Mixup(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    for s in range(10):
        x = torch.rand(4, 3, 20, 20)
        xc, t = cm(x, torch.arange(4), torch.Generator().manual_seed(s))
        kept = (xc == x).all(1).float().mean(dim=(1, 2))[0].item()
        assert math.isclose(kept, cm.last_lam, abs_tol=1e-6)
        assert torch.allclose(t[0, 0], torch.tensor(cm.last_lam)) and torch.allclose(t.sum(1), torch.ones(4))
    # same generator seed -> same result
    a = cm(x, torch.arange(4), torch.Generator().manual_seed(1))
    b = cm(x, torch.arange(4), torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mixup_switch_prob_uses_both():
    mx = Mixup(3, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    g = torch.Generator().manual_seed(0)
    boxes = [mx(torch.rand(2, 3, 8, 8), torch.arange(2), g) and mx.last_box is not None for _ in range(40)]
    assert 5 < sum(boxes) < 35


def test_build_mixup_presets():
    assert build_mixup(DataConfig(augment="light"), 10) is None
    m = build_mixup(DataConfig(augment="imagenet"), 10)
    assert (m.mixup_alpha, m.cutmix_alpha, m.smoothing, m.switch_prob) == (0.8, 1.0, 0.1, 0.5)
    m = build_mixup(DataConfig(augment="light", label_smoothing=0.1), 10)
    _, t = m(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    assert math.isclose(t[0, 0].item(), 0.91, rel_tol=1e-6)


def test_config_presets_and_validation():
    c = DataConfig(augment="imagenet").resolved()
    assert (c.rrc_scale_min, c.rand_augment, c.reprob, c.mixup, c.cutmix, c.label_smoothing) == (
        0.08, "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    c = DataConfig(augment="light", mixup=0.2).resolved()
    assert c.rrc_scale_min == 0.67 and c.mixup == 0.2 and c.rand_augment == ""
    for kw, key in ((dict(augment="heavy"), "augment"), (dict(max_bad_fraction=2.0), "max_bad_fraction"),
                    (dict(reprob=1.5), "reprob"), (dict(num_workers=-1), "num_workers"),
                    (dict(rand_augment="rand-x9"), "rand_augment"), (dict(num_classes=0), "num_classes"),
                    (dict(interpolation="cubic"), "interpolation"), (dict(bad_window=0), "bad_window")):
        with pytest.raises(ValueError, match=f"data.{key}"):
            DataConfig(**kw).resolved()


def test_hydra_structured_config():
    from omegaconf import OmegaConf

    from swinv2_train.data import as_data_config

    node = OmegaConf.merge(OmegaConf.structured(DataConfig), {"augment": "light", "num_classes": 5})
    c = as_data_config(node)
    assert isinstance(c, DataConfig) and c.num_classes == 5
    assert as_data_config({"num_classes": 3}).num_classes == 3
    with pytest.raises(ValueError, match="bogus"):
        as_data_config({"bogus": 1})
