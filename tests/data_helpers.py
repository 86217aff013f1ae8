"""Shared helpers for the data tests (no tests here): tiny shard builders."""
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size=(16, 16), quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path, samples):
    """samples: list of dicts {"__key__": str, ext: bytes}; written in order."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def make_dataset(root, n_shards=8, per_shard=12, size=(16, 16), prefix="train", info=True,
                 corrupt=()):
    """Shards whose .cls is the global sample index (so targets identify samples).
    Shards listed in `corrupt` get one extra sample (key bad<shard>) with undecodable image bytes
    in their middle; _info.json counts it like any sample. Returns (pattern, n_good_samples)."""
    os.makedirs(root, exist_ok=True)
    idx = 0
    names, lengths = [], []
    for sh in range(n_shards):
        samples = []
        for _ in range(per_shard):
            samples.append({"__key__": f"s{idx:05d}", "jpg": jpeg_bytes(idx, size),
                            "cls": str(idx).encode()})
            idx += 1
        if sh in corrupt:
            samples.insert(per_shard // 2, {"__key__": f"bad{sh}", "jpg": b"not a jpeg",
                                            "cls": b"0"})
        name = f"{prefix}-{sh:04d}.tar"
        write_tar(os.path.join(root, name), samples)
        names.append(name)
        lengths.append(len(samples))
    if info:
        with open(os.path.join(root, "_info.json"), "w") as f:
            json.dump({"splits": {prefix: {"name": prefix, "num_samples": sum(lengths),
                                            "filenames": names, "shard_lengths": lengths}}}, f)
    return os.path.join(root, f"{prefix}-{{0000..{n_shards - 1:04d}}}.tar"), idx


def member_offsets(path):
    """{member name: (header offset, data offset)} of a tar file."""
    with tarfile.open(path, "r:") as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}
