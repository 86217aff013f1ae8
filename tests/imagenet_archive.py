"""A miniature ImageNet-21K release for the tests (no tests here): a tar of per-class tars, gzipped or
not, as winter21_whole.tar.gz / fall11_whole.tar / ILSVRC2012_img_train.tar are laid out, with every
kind of bad file the real archives hold mixed in (imagenet21k-facts.md, "Known bad files").

Every image is made with Pillow; names follow the releases: <synset>.tar holding <synset>_<n>.JPEG.
"""
import io
import tarfile
from collections import Counter

import numpy as np
from PIL import Image

# file name -> kind make_shards must report (shards_images.KINDS); the rest are plain RGB JPEGs
BAD_FILES = {  # (class index, image number): kind
    (0, 3): "reencoded_cmyk_jpeg", (5, 1): "reencoded_cmyk_jpeg",
    (1, 2): "reencoded_png", (7, 4): "reencoded_png",
    (2, 5): "reencoded_gif", (3, 6): "reencoded_webp",
    (4, 0): "kept_jpeg",  # grayscale: kept as it is
    (6, 7): "truncated", (8, 2): "truncated",
    (9, 9): "empty", (10, 1): "undecodable", (11, 3): "undecodable",
}


def synset(i: int) -> str:
    return f"n{1440764 + 1017 * i:08d}"


def _image(rng, size=(20, 15)) -> Image.Image:
    """A small picture with some texture (a flat colour would compress to nothing)."""
    base = rng.integers(30, 225, size=3)
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_bytes(kind: str, rng) -> bytes:
    img = _image(rng)
    if kind == "reencoded_cmyk_jpeg":
        return _encode(img.convert("CMYK"), "JPEG", quality=90)
    if kind == "reencoded_png":
        return _encode(img.convert("RGBA"), "PNG")
    if kind == "reencoded_gif":
        return _encode(img.convert("P"), "GIF")
    if kind == "reencoded_webp":
        return _encode(img, "WEBP", quality=90)
    if kind == "kept_jpeg_gray":
        return _encode(img.convert("L"), "JPEG", quality=90)
    if kind == "truncated":
        data = _encode(img, "JPEG", quality=90)
        return data[:len(data) // 2]
    if kind == "empty":
        return b""
    if kind == "undecodable":
        return b"<html>404 Not Found</html>" * 3
    return _encode(img, "JPEG", quality=90)


def class_images(num_classes: int, per_class: int, seed: int = 0):
    """{synset: [(member name, bytes), ...]} with BAD_FILES mixed in, and the expected kind counts."""
    rng = np.random.default_rng(seed)
    classes, kinds = {}, Counter()
    for c in range(num_classes):
        images = []
        for n in range(per_class):
            kind = BAD_FILES.get((c, n), "kept_jpeg")
            made = "kept_jpeg_gray" if (c, n) == (4, 0) else kind
            images.append((f"{synset(c)}_{1000 + n}.JPEG", image_bytes(made, rng)))
            kinds[kind] += 1
        classes[synset(c)] = images
    return classes, kinds


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1700000000
    tf.addfile(info, io.BytesIO(data))


def write_archive(path, num_classes: int = 12, per_class: int = 25, gz: bool = True, seed: int = 0) -> Counter:
    """The miniature release at `path`; returns the kinds make_shards must count."""
    classes, kinds = class_images(num_classes, per_class, seed)
    with tarfile.open(path, "w:gz" if gz else "w") as outer:
        _add(outer, "README.txt", b"not a class: ignored\n")
        for cls, images in classes.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for name, data in images:
                    _add(tf, name, data)
            _add(outer, f"{cls}.tar", inner.getvalue())
    return kinds
