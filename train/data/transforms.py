"""Image transforms on PIL + numpy + torch (no torchvision: it cannot be imported here).

Every random transform takes an explicit `random.Random` so a sample's augmentation is a pure
function of its seed (derived from (seed, epoch, key)), independent of worker assignment.
Semantics follow timm's `create_transform` as used by the official Swin V2 `build_transform`.

The data workers run `TrainTransform` / `EvalTransform`: bytes -> (uint8 (3,S,S) pixels, erase box).
Workers hand over 1 byte a pixel; normalisation and random erasing run on the device
(`feed.DeviceFeed`), with the erase box drawn here from the sample's own generator, in the same
order as before, so the same seed gives the same tensors. The crop-resize is torch's antialiased
bicubic resize of the uint8 crop (2x faster than Pillow's here, PIL's kernel; pixels within a few
levels of Pillow's, tests/test_data_transforms.py). `ReferenceTrainTransform` and
`ReferenceEvalTransform` are the readable transforms they replace (Pillow resize, float32
normalised output, erasing in the worker): the tests and scripts/bench_loader.py hold the fast ones
to them.
"""
from __future__ import annotations

import io
import math
import random
import warnings
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

_INTERP = {
    "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING,
}


def pil_interp(name: str):
    return _INTERP[name]


# ----------------------------------------------------------------------------- decoding
class CorruptImageError(ValueError):
    """The image bytes cannot be decoded. Only this counts as a bad sample: an exception in
    augmentation code is a bug and must propagate, not be silently counted."""


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only): the size is known before the pixels are decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.size[0] < 1 or img.size[1] < 1:
            raise ValueError("empty image")
        return img
    except Exception as e:
        raise CorruptImageError(f"cannot open image: {e}") from e


def finish_decode(img: Image.Image) -> Image.Image:
    """Force the full decode (raises on truncated/corrupt data) and convert to RGB."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:
        raise CorruptImageError(f"cannot decode image: {e}") from e


def _draft(img: Image.Image, req_w: int, req_h: int) -> None:
    # JPEG DCT-domain downscale by 1/2, 1/4, 1/8 while staying >= the requested size: much
    # cheaper decode for large images. A no-op for other formats.
    if getattr(img, "format", None) == "JPEG" and (req_w < img.size[0] or req_h < img.size[1]):
        img.draft("RGB", (max(1, req_w), max(1, req_h)))


# ----------------------------------------------------------------------------- geometry
def rrc_params(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
               rng: random.Random) -> Tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): timm/torchvision semantics, 10 attempts."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # fallback: central crop of the whole image with the ratio clamped
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_short(img: Image.Image, size: int, interp) -> Image.Image:
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    return img.resize((nw, nh), interp)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------- RandAugment
_LEVEL_DENOM = 10.0


def _negate(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img, matrix, fill, interp):
    return img.transform(img.size, Image.AFFINE, matrix, resample=interp, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _op(name: str, increasing: bool):
    """Return fn(img, level, rng, hp) for one timm RandAugment op (level in [0, 10])."""
    frac = lambda lvl: lvl / _LEVEL_DENOM  # noqa: E731
    if name == "AutoContrast":
        return lambda img, l, r, hp: ImageOps.autocontrast(img)
    if name == "Equalize":
        return lambda img, l, r, hp: ImageOps.equalize(img)
    if name == "Invert":
        return lambda img, l, r, hp: ImageOps.invert(img)
    if name == "Rotate":
        return lambda img, l, r, hp: img.rotate(
            _negate(frac(l) * 30.0, r), resample=hp["interp"], fillcolor=hp["fill"])
    if name == "Posterize":
        def post(img, l, r, hp):
            bits = 4 - int(frac(l) * 4) if increasing else int(frac(l) * 4)
            # Pillow >= 10 rejects 0 bits (old Pillow returned black); 1 bit is the closest.
            return img if bits >= 8 else ImageOps.posterize(img, max(bits, 1))
        return post
    if name == "Solarize":
        def sol(img, l, r, hp):
            thresh = 256 - int(frac(l) * 256) if increasing else int(frac(l) * 256)
            return ImageOps.solarize(img, thresh)
        return sol
    if name == "SolarizeAdd":
        return lambda img, l, r, hp: _solarize_add(img, int(frac(l) * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        enh = getattr(ImageEnhance, name)

        def en(img, l, r, hp):
            if increasing:  # 1 +- 0.9*level: further from identity as level grows
                factor = max(0.1, 1.0 + _negate(frac(l) * 0.9, r))
            else:
                factor = frac(l) * 1.8 + 0.1
            return enh(img).enhance(factor)
        return en
    if name in ("ShearX", "ShearY"):
        def shear(img, l, r, hp):
            s = _negate(frac(l) * 0.3, r)
            m = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
            return _affine(img, m, hp["fill"], hp["interp"])
        return shear
    if name in ("TranslateXRel", "TranslateYRel"):
        def tr(img, l, r, hp):
            pct = _negate(frac(l) * hp["translate_pct"], r)
            if name == "TranslateXRel":
                m = (1, 0, pct * img.size[0], 0, 1, 0)
            else:
                m = (1, 0, 0, 0, 1, pct * img.size[1])
            return _affine(img, m, hp["fill"], hp["interp"])
        return tr
    raise ValueError(f"unknown RandAugment op {name}")


_RAND_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
             "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
             "TranslateXRel", "TranslateYRel"]


def parse_rand_augment(spec: str) -> dict:
    """Parse a timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' -> dict(m, n, mstd, ...)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand-': {spec!r}")
    out = dict(m=_LEVEL_DENOM, n=2, mstd=0.0, mmax=_LEVEL_DENOM, p=0.5, inc=False)
    for part in parts[1:]:
        for key in ("mstd", "mmax", "inc", "m", "n", "p"):  # longest prefixes first
            if part.startswith(key):
                val = part[len(key):]
                try:
                    num = float(val)
                except ValueError:
                    raise ValueError(f"bad value in RandAugment spec {spec!r}: {part!r}") from None
                out[key] = bool(int(num)) if key == "inc" else (int(num) if key == "n" else num)
                break
        else:
            raise ValueError(f"unsupported RandAugment option {part!r} in {spec!r}")
    return out


class RandAugment:
    """timm RandAugment: n ops drawn with replacement, each applied with prob p at magnitude
    m (+ gaussian noise of std mstd, clipped to [0, mmax]); 'inc1' = increasing-severity ops."""

    def __init__(self, spec: str, fill: Tuple[int, int, int], interp=Image.BICUBIC,
                 translate_pct: float = 0.45):
        a = parse_rand_augment(spec)
        self.m, self.n, self.mstd, self.mmax, self.p = a["m"], a["n"], a["mstd"], a["mmax"], a["p"]
        self.ops = [(nm, _op(nm, a["inc"])) for nm in _RAND_OPS]
        self.hp = dict(fill=fill, interp=interp, translate_pct=translate_pct)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.n):
            _, fn = self.ops[rng.randrange(len(self.ops))]
            if self.p < 1.0 and rng.random() > self.p:
                continue
            m = self.m
            if self.mstd == float("inf"):
                m = rng.uniform(0, m)
            elif self.mstd > 0:
                m = rng.gauss(m, self.mstd)
            m = max(0.0, min(m, self.mmax))
            img = fn(img, m, rng, self.hp)
        return img


# ----------------------------------------------------------------------------- colour / erase
def color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness/contrast/saturation each by U[1-s, 1+s], in random order (no hue)."""
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for enh in ops:
        img = enh(img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


def to_tensor_normalized(img: Image.Image, mean, std) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


Erase = Tuple[int, int, int, int, int]   # (top, left, height, width, noise seed); height 0: none
NO_ERASE: Erase = (0, 0, 0, 0, 0)


def erase_box(prob: float, rng: random.Random, h: int, w: int, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3) -> Erase:
    """timm RandomErasing's random draws (mode 'pixel', one box) for an h x w image: the box and
    the seed of its N(0,1) noise, or NO_ERASE. Draws exactly what `random_erase` draws."""
    if prob <= 0 or rng.random() > prob:
        return NO_ERASE
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * h * w
        aspect = math.exp(rng.uniform(*log_aspect))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top = rng.randint(0, h - eh)
            left = rng.randint(0, w - ew)
            return top, left, eh, ew, rng.getrandbits(63)
    return NO_ERASE


def erase_noise(box: Erase, channels: int = 3) -> torch.Tensor:
    """The box's noise: float32 N(0,1) from a CPU generator seeded with the box's seed."""
    g = torch.Generator().manual_seed(box[4])
    return torch.randn((channels, box[2], box[3]), generator=g)


def random_erase(x: torch.Tensor, prob: float, rng: random.Random,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3
                 ) -> torch.Tensor:
    """timm RandomErasing, mode 'pixel', one box: N(0,1) noise per pixel on the normalised image."""
    c, h, w = x.shape
    box = erase_box(prob, rng, h, w, min_area, max_area, min_aspect)
    if box[2] > 0:
        top, left, eh, ew, _ = box
        x[:, top:top + eh, left:left + ew] = erase_noise(box, c)
    return x


# ----------------------------------------------------------------------------- pipelines
def use_test_crop(test_crop: Optional[bool], img_size: int) -> bool:
    # Official: TEST.CROP=True by default; the 384-px fine-tune configs set it False.
    return img_size < 384 if test_crop is None else bool(test_crop)


class ReferenceEvalTransform:
    """The readable eval transform (Pillow resize, float output): bytes -> normalised (3,S,S):
    resize short side to S/crop_pct + centre crop, or a direct S x S resize when not cropping
    (official TEST.CROP=False)."""

    def __init__(self, img_size: int, *, interpolation="bicubic", test_crop=None,
                 crop_pct=224 / 256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 draft=True):
        self.size = img_size
        self.crop = use_test_crop(test_crop, img_size)
        self.resize = int(img_size / crop_pct)
        self.interp = pil_interp(interpolation)
        self.mean, self.std, self.draft = list(mean), list(std), draft

    def decode(self, data: bytes) -> Image.Image:
        img = open_image(data)
        w, h = img.size
        if self.draft:
            if self.crop:  # short side must stay >= the resize target
                f = min(w, h) / self.resize
            else:
                f = min(w / self.size, h / self.size)
            if f >= 2:
                _draft(img, math.ceil(w / f), math.ceil(h / f))
        return finish_decode(img)

    def geometry(self, img: Image.Image) -> Image.Image:
        if self.crop:
            return center_crop(resize_short(img, self.resize, self.interp), self.size)
        return img.resize((self.size, self.size), self.interp)

    def __call__(self, data: bytes, rng: Optional[random.Random] = None) -> torch.Tensor:
        return to_tensor_normalized(self.geometry(self.decode(data)), self.mean, self.std)


class ReferenceTrainTransform:
    """The readable train transform (Pillow resize, float output, erasing here): bytes ->
    normalised (3,S,S): RRC (+draft) -> flip -> RandAugment | colour jitter -> normalise ->
    random erasing. Pure function of (bytes, rng)."""

    def __init__(self, img_size: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                 rand_augment: str = "", color_jitter: float = 0.0,
                 force_color_jitter: bool = False, reprob: float = 0.0,
                 interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), draft=True):
        self.size = img_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip, self.reprob = hflip, reprob
        self.interp = pil_interp(interpolation)
        self.mean, self.std, self.draft = list(mean), list(std), draft
        fill = tuple(min(255, round(255 * m)) for m in mean)
        self.ra = RandAugment(rand_augment, fill=fill, interp=self.interp) if rand_augment else None
        # timm create_transform: colour jitter is disabled when auto-augment is on unless forced.
        self.cj = color_jitter if (color_jitter > 0 and (self.ra is None or force_color_jitter)) else 0.0

    def crop_box(self, width: int, height: int, rng: random.Random):
        return rrc_params(width, height, self.scale, self.ratio, rng)

    def decode_crop(self, data: bytes, rng: random.Random):
        """Decode (draft-decoded when the crop allows) and draw the crop box: (image, (top, left,
        h, w)) in the decoded image's pixels, or (the resized crop, None) when draft decoding made
        the box fractional (Pillow resizes it, as the reference)."""
        img = open_image(data)
        W, H = img.size
        top, left, h, w = self.crop_box(W, H, rng)
        if self.draft:
            f = min(w, h) / self.size  # keep the crop >= output size after the DCT downscale
            if f >= 2:
                _draft(img, math.ceil(W / f), math.ceil(H / f))
        img = finish_decode(img)
        if img.size == (W, H):
            return img, (top, left, h, w)
        sx, sy = img.size[0] / W, img.size[1] / H
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return img.resize((self.size, self.size), self.interp, box=box), None

    def colour(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """RandAugment, else colour jitter (timm), on the resized, flipped crop."""
        if self.ra is not None:
            img = self.ra(img, rng)
        if self.cj > 0:
            img = color_jitter(img, self.cj, rng)
        return img

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img, box = self.decode_crop(data, rng)
        if box is not None:
            top, left, h, w = box
            img = img.resize((self.size, self.size), self.interp, box=(left, top, left + w, top + h))
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = to_tensor_normalized(self.colour(img, rng), self.mean, self.std)
        return random_erase(x, self.reprob, rng)


# ----------------------------------------------------------------------------- fast path
def _pixels(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 view of a decoded RGB image (one copy, Pillow's); never written to."""
    with warnings.catch_warnings():  # the array is read-only; nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img))


def resize_u8(hwc: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Antialiased bicubic resize (Pillow's kernel, a = -0.5) of an (h, w, 3) uint8 view ->
    (3, out_h, out_w) uint8 with channels-last strides (a permute of (out_h, out_w, 3)). The crop
    is copied into channels-last memory first: torch's vectorised uint8 path takes that layout
    (9% faster per image here than the strided view, and the output needs no gather for Pillow)."""
    x = hwc.permute(2, 0, 1).unsqueeze(0)
    if x.shape[-2:] == (out_h, out_w):
        return x[0]
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)[0]


def to_pil(chw: torch.Tensor) -> Image.Image:
    return Image.fromarray(chw.permute(1, 2, 0).numpy())


def to_chw(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view (HWC memory): the batch's torch.stack makes the one CHW copy."""
    return _pixels(img).permute(2, 0, 1)


class EvalTransform(ReferenceEvalTransform):
    """bytes -> (uint8 (3,S,S), NO_ERASE): the reference's resize and centre crop on uint8
    pixels (torch's bicubic resize with `resize="torch"`, Pillow's with "pil"). The pixels may be
    a strided view: the batch's torch.stack makes them contiguous (one copy instead of two)."""

    def __init__(self, img_size: int, *, resize: str = "torch", **kw):
        super().__init__(img_size, **kw)
        self.fast = resize == "torch" and self.interp == Image.BICUBIC

    def __call__(self, data: bytes, rng: Optional[random.Random] = None):
        img = self.decode(data)
        if not self.fast:
            return to_chw(self.geometry(img)), NO_ERASE
        w, h = img.size
        if self.crop:
            nw, nh = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
            x = resize_u8(_pixels(img), nh, nw)
            top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
            x = x[:, top:top + self.size, left:left + self.size]
        else:
            x = resize_u8(_pixels(img), self.size, self.size)
        return x, NO_ERASE


class TrainTransform(ReferenceTrainTransform):
    """bytes -> (uint8 (3,S,S), erase box): the reference's crop box, flip, RandAugment and colour
    jitter, then the erase box drawn from the same generator; normalisation and the erasing itself
    are `feed.DeviceFeed`'s. The crop is resized by torch (`resize="torch"`) unless the image was
    draft-decoded (a fractional box: Pillow's resize, as the reference) or with `resize="pil"`."""

    def __init__(self, img_size: int, *, resize: str = "torch", **kw):
        super().__init__(img_size, **kw)
        self.fast = resize == "torch" and self.interp == Image.BICUBIC

    def __call__(self, data: bytes, rng: random.Random):
        img, box = self.decode_crop(data, rng)
        flip = self.hflip > 0 and rng.random() < self.hflip
        if self.fast and box is not None:
            top, left, h, w = box
            x = resize_u8(_pixels(img)[top:top + h, left:left + w], self.size, self.size)
            if self.ra is None and self.cj <= 0:  # crop + flip only: no PIL round trip
                return (x.flip(-1) if flip else x), erase_box(self.reprob, rng, self.size, self.size)
            img = to_pil(x)
        elif box is not None:
            top, left, h, w = box
            img = img.resize((self.size, self.size), self.interp, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = self.colour(img, rng)
        return to_chw(img), erase_box(self.reprob, rng, self.size, self.size)


def build_transform(cfg, img_size: int, train: bool, reference: bool = False) -> Callable:
    """Transform for a (resolved) DataConfig. augment='none' trains with the eval transform.
    The workers' transforms give (uint8 pixels, erase box); `reference=True` gives the readable
    ones they replace (normalised float32, erasing applied), which the tests and the loader
    benchmark compare with."""
    common = dict(interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, draft=cfg.jpeg_draft)
    evaluate, train_ = ((ReferenceEvalTransform, ReferenceTrainTransform) if reference
                        else (EvalTransform, TrainTransform))
    if not reference:
        common["resize"] = cfg.resize
    if not train or cfg.augment == "none":
        return evaluate(img_size, test_crop=cfg.test_crop, crop_pct=cfg.crop_pct, **common)
    return train_(
        img_size, scale=(cfg.rrc_scale_min, 1.0), ratio=tuple(cfg.rrc_ratio), hflip=cfg.hflip,
        rand_augment=cfg.rand_augment or "", color_jitter=cfg.color_jitter,
        force_color_jitter=cfg.force_color_jitter, reprob=cfg.reprob, **common)
