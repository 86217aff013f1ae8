"""The inputs of swinv2-make-shards: an ImageFolder, a list file, or a tar of per-class tars.

Every image becomes a `Sample`: its name in the source (`class/image.JPEG`, the path it would have
extracted), its class, and where its bytes lie: a file under a base folder, an offset in it and a
size (-1: the whole file). No image is ever extracted to a file of its own: an image inside an
archive is read at its offset.

An archive (`fall11_whole.tar`, `winter21_whole.tar.gz`, `ILSVRC2012_img_train.tar`: one
`<synset>.tar` member per class) is *prepared* once into `prepared/`:
- uncompressed: its members are indexed where they lie (offsets into SRC itself; nothing copied);
- gzipped: it can only be read from start to end, so it is streamed once and its inner tars are
  written out as `prepared/<synset>.tar` (about the archive's uncompressed size), then indexed.
`prepared/index.jsonl.gz` holds the index and `prepared/prepared.json`, written last, says for
which archive (path, size, mtime) it is complete.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PREPARED_DONE = "prepared.json"
INDEX = "index.jsonl.gz"
COPY_CHUNK = 1 << 20
TAIL_LIMIT = 1 << 24  # the zero padding after a tar's end is one record (10 KiB by default), never this


class SourceError(Exception):
    """A problem with the user's input: one message, naming it and the way out."""


class Sample(NamedTuple):
    name: str    # the image's path in the source, e.g. n01440764/n01440764_10026.JPEG
    cls: str     # class name (synset id, folder name, or a list file's integer label)
    file: str    # where the bytes are: relative to the source's base folder (or absolute)
    offset: int  # byte offset of the image in `file`
    size: int    # bytes; -1: the whole file


class Source(NamedTuple):
    kind: str                  # "folder", "list" or "archive"
    path: str                  # SRC, absolute
    base: str                  # the folder Sample.file is relative to
    samples: List[Sample]
    fingerprint: dict          # what identifies the input (a changed input is refused)
    natural_classes: Optional[List[str]]  # a list file's label order ("0".."n-1"); else None
    damaged: List[str] = []    # an archive's damaged inner tars (their images before the damage are used)


def is_archive(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return True
    return tarfile.is_tarfile(path)


def is_gzipped(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------- folder and list
def scan_folder(src: str, with_sizes: bool = False) -> Source:
    """ImageFolder layout: src/<class_name>/<image> (sub-folders of a class count as that class)."""
    src = os.path.abspath(src)
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise SourceError(f"{src}: no class sub-folders (expected SRC/<class>/<image>)")
    samples = []
    for c in classes:
        for dirpath, dirs, files in os.walk(os.path.join(src, c)):
            dirs.sort()
            for fn in files:
                if fn.lower().endswith(IMG_EXTS):
                    rel = os.path.relpath(os.path.join(dirpath, fn), src)
                    size = os.path.getsize(os.path.join(src, rel)) if with_sizes else -1
                    samples.append(Sample(rel, c, rel, 0, size))
    names = sorted(s.name for s in samples)
    fingerprint = {"images": len(names), "names_sha256": _sha256_lines(names)}
    return Source("folder", src, src, samples, fingerprint, None)


def read_list(path: str, root: Optional[str], with_sizes: bool = False) -> Source:
    """`path label` per line, label an integer; relative paths are relative to --root or to the
    list file's folder."""
    path = os.path.abspath(path)
    base = os.path.abspath(root or os.path.dirname(path))
    samples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError:
            raise SourceError(f"{path}: neither a folder, a tar archive nor a list file of 'path label' lines")
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            p, lab = line.rsplit(None, 1)
            label = int(lab)
        except ValueError:
            raise SourceError(f"{path}:{n}: expected 'path label' (label an integer), got {line!r}")
        if label < 0:
            raise SourceError(f"{path}:{n}: negative label {label}")
        size = os.path.getsize(os.path.join(base, p)) if with_sizes else -1
        samples.append(Sample(p, str(label), p, 0, size))
    if not samples:
        raise SourceError(f"list file {path} has no entries")
    n_cls = max(int(s.cls) for s in samples) + 1
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return Source("list", path, base, samples, {"list_sha256": digest, "root": base},
                  [str(i) for i in range(n_cls)])


def _sha256_lines(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- archives
def _class_of_member(name: str) -> Optional[str]:
    """`n01440764.tar` (at any depth) -> `n01440764`; None for members that are not inner tars."""
    base = os.path.basename(name)
    return base[:-4] if base.endswith(".tar") and len(base) > 4 else None


def _index_inner(fileobj, shift: int, cls: str, file: str, damaged: List[str]) -> List[Tuple[str, str, int, int]]:
    """(name, file, offset, size) of the images of one inner tar read from `fileobj`; offsets are
    relative to the inner tar's start plus `shift`. A damaged inner tar gives the images before the
    damage, and a line in `damaged`: one bad class does not stop a 19,000-class archive."""
    rows = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as inner:
            for m in inner:
                if m.isfile() and m.name.lower().endswith(IMG_EXTS):
                    rows.append((f"{cls}/{os.path.basename(m.name)}", file, shift + m.offset_data, m.size))
    except tarfile.TarError as e:
        damaged.append(f"{cls}.tar: damaged after {len(rows)} images ({type(e).__name__}: {e})")
    return rows


class _Window:
    """A read-only file view of bytes [start, start + size) of an open file (an inner tar)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def index_uncompressed(src: str, damaged: List[str]) -> List[Tuple[str, str, int, int]]:
    """Index the images of an uncompressed tar of per-class tars where they lie in SRC."""
    rows, end, last = [], 0, "(none)"
    file = os.path.basename(src)
    with open(src, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as outer:
        for m in outer:
            end, last = max(end, m.offset_data + m.size), m.name
            cls = _class_of_member(m.name) if m.isfile() else None
            if cls is not None:
                rows.extend(_index_inner(_Window(raw, m.offset_data, m.size), m.offset_data, cls, file, damaged))
        if end > os.path.getsize(src):
            raise SourceError(f"{src}: ends inside its last member; a cut-off download? Download it again")
        raw.seek(outer.offset)
        _check_tail(raw, src, last)
    return rows


def _check_tail(fileobj, src: str, last: str) -> None:
    """Where tarfile stops, only the end-of-archive zeros may follow: tarfile also stops, silently,
    at a damaged member header, and what follows it would be lost without a word."""
    seen = 0
    while True:
        chunk = fileobj.read(COPY_CHUNK)
        if not chunk:
            return
        if chunk.count(0) != len(chunk) or seen > TAIL_LIMIT:
            raise SourceError(f"{src}: damaged after its member {last!r} (what follows is not a tar "
                              f"header); download it again")
        seen += len(chunk)


def _open_stream(src: str):
    """A decompressed byte stream of a gzipped archive: pigz where installed (faster), else gzip."""
    if shutil.which("pigz"):
        proc = subprocess.Popen(["pigz", "-dc", src], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return proc.stdout, proc
    return gzip.open(src, "rb"), None


def extract_gzipped(src: str, prepared: str, damaged: List[str]) -> List[Tuple[str, str, int, int]]:
    """Stream a gzipped tar of per-class tars once, writing each inner tar to `prepared/`.
    An inner tar already there with the right size (an interrupted earlier pass) is kept."""
    rows, last = [], "(none)"
    stream, proc = _open_stream(src)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as outer:
            for m in outer:
                last = m.name
                cls = _class_of_member(m.name) if m.isfile() else None
                if cls is None:
                    continue
                dest = os.path.join(prepared, f"{cls}.tar")
                if not (os.path.exists(dest) and os.path.getsize(dest) == m.size):
                    _copy_member(outer.extractfile(m), dest)
                with open(dest, "rb") as f:
                    rows.extend(_index_inner(f, 0, cls, f"{cls}.tar", damaged))
        _check_tail(stream, src, last)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise SourceError(f"{src}: cannot read it to the end ({type(e).__name__}: {e}); a cut-off "
                          f"download? Check it with `gzip -t {src}` and download it again") from None
    finally:
        if proc is not None:
            proc.stdout.close()
            if proc.wait() != 0:
                raise SourceError(f"{src}: pigz -dc failed ({proc.stderr.read().decode().strip()}); "
                                  f"check it with `gzip -t {src}`")
    return rows


def _copy_member(fileobj, dest: str) -> None:
    tmp = f"{dest}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        shutil.copyfileobj(fileobj, out, COPY_CHUNK)
    os.replace(tmp, dest)


def is_prepared(src: str, prepared: str) -> bool:
    """Whether `prepared` holds a complete preparation of this very archive."""
    try:
        with open(os.path.join(prepared, PREPARED_DONE)) as f:
            return json.load(f)["fingerprint"] == {"archive": os.path.abspath(src), **file_fingerprint(src)}
    except (OSError, ValueError, KeyError):
        return False


def prepare_archive(src: str, prepared: str, progress=print) -> Tuple[str, list, List[str]]:
    """(base folder of the index's files, index rows, damaged inner tars) of an archive, preparing
    it if that was not done for this very archive. Call it under the output's lock: parallel parts
    must not race."""
    src = os.path.abspath(src)
    fingerprint = {"archive": src, **file_fingerprint(src)}
    done_path = os.path.join(prepared, PREPARED_DONE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["fingerprint"] == fingerprint:
            return done["base"], _read_index(os.path.join(prepared, INDEX)), done["damaged"]
        os.remove(done_path)  # prepared from another archive (or an older copy): redo
    os.makedirs(prepared, exist_ok=True)
    damaged: List[str] = []
    if is_gzipped(src):
        progress(f"preparing {src}: one pass over the gzipped archive, inner tars into {prepared}")
        base, rows = os.path.abspath(prepared), extract_gzipped(src, prepared, damaged)
    else:
        progress(f"preparing {src}: indexing its inner tars where they lie")
        base, rows = os.path.dirname(src), index_uncompressed(src, damaged)
    for line in damaged:
        progress(f"warning: {line}; its readable images are used")
    if not rows:
        raise SourceError(f"{src}: no per-class <synset>.tar members holding images; expected a tar of "
                          f"per-class tars (fall11_whole.tar, winter21_whole.tar.gz, ILSVRC2012_img_train.tar)")
    _write_index(os.path.join(prepared, INDEX), rows)
    atomic_json(done_path, {"fingerprint": fingerprint, "base": base, "images": len(rows), "damaged": damaged})
    return base, rows, damaged


def scan_archive(src: str, prepared: str, progress=print) -> Source:
    base, rows, damaged = prepare_archive(src, prepared, progress)
    samples = [Sample(name, name.split("/", 1)[0], file, offset, size) for name, file, offset, size in rows]
    return Source("archive", os.path.abspath(src), base, samples,
                  {"archive": os.path.abspath(src), **file_fingerprint(src)}, None, damaged)


def _write_index(path: str, rows) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _read_index(path: str) -> List[Tuple[str, str, int, int]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [tuple(json.loads(line)) for line in f]


def atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading bytes
class ByteReader:
    """Reads samples' bytes with positioned reads, keeping recently used files open (a shard draws
    from ~1,000 classes' inner tars, or from the one uncompressed archive)."""

    def __init__(self, base: str, max_open: int = 256):
        self.base, self.max_open = base, max_open
        self.fds: Dict[str, int] = {}

    def read(self, file: str, offset: int, size: int) -> bytes:
        path = os.path.join(self.base, file)
        if size < 0:
            with open(path, "rb") as f:
                return f.read()
        fd = self.fds.pop(file, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= self.max_open:
                os.close(self.fds.pop(next(iter(self.fds))))  # the least recently used
        self.fds[file] = fd  # re-inserted: now the most recently used
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
