"""What swinv2-make-shards does with one source image: keep it, re-encode it, or skip it.

The releases hold a few files a JPEG loader chokes on (imagenet21k-facts: CMYK JPEGs, a PNG named
.JPEG, truncated and unreadable files in the 21K archives). Each image is fully decoded once here,
so such a file is found while writing shards, not hours into a training run:

- a JPEG in RGB or grayscale is kept byte for byte (no generation loss);
- a CMYK JPEG, and PNG / GIF / WebP (or any other format Pillow reads) bytes, are re-encoded to an
  RGB JPEG, whatever the file's name says;
- an empty, truncated or undecodable file is skipped (and one that cannot be read at all, e.g.
  a list file's entry deleted since planning).
"""
from __future__ import annotations

import io
import warnings
from typing import NamedTuple, Optional

KEPT = "kept_jpeg"
SKIP_KINDS = ("empty", "truncated", "undecodable", "unreadable")  # unreadable: the file itself (I/O)
# every kind a summary counts, in the order it prints them
KINDS = (KEPT, "reencoded_cmyk_jpeg", "reencoded_png", "reencoded_gif", "reencoded_webp",
         "reencoded_other") + SKIP_KINDS


class Verdict(NamedTuple):
    kind: str              # one of KINDS
    data: Optional[bytes]  # the JPEG bytes to store; None when skipped
    reason: str = ""       # why it was skipped (for the list of skipped files)


def reencoded_kind(fmt: str, mode: str) -> str:
    if fmt == "JPEG":
        return "reencoded_cmyk_jpeg" if mode == "CMYK" else "reencoded_other"
    return {"PNG": "reencoded_png", "GIF": "reencoded_gif", "WEBP": "reencoded_webp"}.get(fmt, "reencoded_other")


def failure_kind(error: Exception) -> str:
    """Pillow says "image file is truncated" / "Truncated File Read" when the bytes run out."""
    return "truncated" if isinstance(error, EOFError) or "truncated" in str(error).lower() else "undecodable"


def judge_image(data: bytes, quality: int) -> Verdict:
    """The verdict on one file's bytes. Never raises for bad bytes: a bad file is a skip."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return Verdict("empty", None, "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Verdict("undecodable", None, "not an image format Pillow can identify")
    except Exception as e:  # a header Pillow cannot parse, or one cut short
        return Verdict(failure_kind(e), None, f"{type(e).__name__}: {e}")
    with img, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. palette transparency: converted to RGB all the same
        fmt, mode = img.format, img.mode
        try:
            img.load()  # a full decode: the only way to see a cut-off scan
        except Exception as e:
            return Verdict(failure_kind(e), None, f"{type(e).__name__}: {e}")
        if fmt == "JPEG" and mode in ("RGB", "L"):
            return Verdict(KEPT, data)
        rgb = img.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return Verdict(reencoded_kind(fmt, mode), out.getvalue())
