"""Remote shards (http(s)://, pipe:) read with bounded retries and a stall limit.

Replaces webdataset's opener for these schemes (curl with `--retry 30` and no time limit, so a
stalled server hangs a worker until the DataLoader's timeout fails the whole run). Policy
(`ShardIO`, from `data.io_retries` and `data.io_timeout_s`):

* `timeout_s` is the longest wait without a byte: the socket timeout of every connect and read,
  or the `select` limit on a pipe.
* A failed try (connection refused or dropped, an HTTP status a retry can cure, a stall, a
  command that exits non-zero) is retried from the byte where it stopped, at most `retries` times
  per shard: http asks for the rest with a Range request (a server that ignores it sends the whole
  file and the bytes already read are skipped); a pipe command is run again and its first bytes
  skipped. Each retry is counted (`counts[io_retries]`).
* Between tries a backoff pause (0.25 s, doubling) that never makes a try's silent wait longer than
  `timeout_s`: a shard whose server sends nothing costs at most timeout_s x (retries + 1).
* What cannot be cured is not retried: 4xx other than 408/429, and a file that changed between
  tries (another length or ETag). When the tries are spent, `RemoteReadError` (an OSError) goes to
  the tar reader, which counts the shard as unreadable (nothing read) or truncated (cut short).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from http.client import HTTPException
from typing import Callable, Optional
from urllib.parse import urlparse

IO_RETRIES = "io_retries"  # the Counter key (shards.IO_EVENTS re-exports it)
FIRST_PAUSE_S = 0.25
CHUNK = 1 << 16
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


@dataclasses.dataclass(frozen=True)
class ShardIO:
    """How hard a remote shard is tried: `retries` more tries, `timeout_s` without a byte each."""

    retries: int
    timeout_s: float

    @classmethod
    def of(cls, cfg) -> "ShardIO":
        return cls(int(cfg.io_retries), float(cfg.io_timeout_s))

    @classmethod
    def default(cls) -> "ShardIO":
        from .config import DataConfig  # the defaults live there only

        return cls.of(DataConfig())


class RemoteReadError(OSError):
    """A remote shard could not be read, after the retries it was allowed."""


class _Permanent(RemoteReadError):
    """A failure no retry can cure (404, a file changed between tries); `status`: the HTTP one."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def handles(url: str) -> bool:
    return url.startswith("pipe:") or urlparse(url).scheme in ("http", "https")


def open_remote(url: str, io: ShardIO, counts: Counter) -> "RetryingReader":
    connect = _pipe_source(url[len("pipe:"):], io) if url.startswith("pipe:") else _HttpSource(url, io)
    return RetryingReader(url, connect, io, counts)


def read_url(url: str, io: ShardIO) -> bytes:
    """The whole body of a small file (e.g. `_info.json`), with the same retries."""
    reader = open_remote(url, io, Counter())
    try:
        parts = []
        while True:
            b = reader.read(CHUNK)
            if not b:
                return b"".join(parts)
            parts.append(b)
    finally:
        reader.close()


@functools.lru_cache(maxsize=16)
def read_small_file(url: str, io: ShardIO) -> Optional[bytes]:
    """The body of a small file such as `_info.json`, or None when the server has none
    (404/410); other failures raise RemoteReadError. Read once per process: the sources, the
    class count and the stream's shard lengths all ask for the same file."""
    try:
        return read_url(url, io)
    except _Permanent as e:
        if e.status in (404, 410):
            return None
        raise


# ----------------------------------------------------------------------------- retries
class RetryingReader:
    """File-like `read(n)` over a remote shard; see the module docstring for the policy."""

    def __init__(self, url: str, connect: Callable[[int], "_Body"], io: ShardIO, counts: Counter):
        self.url, self.connect, self.io, self.counts = url, connect, io, counts
        self.pos, self.retries_left, self.body = 0, io.retries, None
        self.waiting_since = time.monotonic()  # the last byte, or the start of this try
        self._reconnect()

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while True:
            try:
                data = self.body.read(size)
            except (OSError, HTTPException) as e:  # a drop, a stall, a reset
                self._retry(e)
                continue
            if data:
                self.pos += len(data)
                self.waiting_since = time.monotonic()
                return data
            if self.body.complete(self.pos):
                return b""
            self._retry(RemoteReadError(f"{self.url}: connection closed at byte {self.pos}"))

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def _reconnect(self) -> None:
        while True:
            try:
                self.body = self.connect(self.pos)
                return
            except _Permanent:
                raise
            except (OSError, HTTPException) as e:
                self._pause_or_fail(e)

    def _retry(self, error: Exception) -> None:
        self.close()
        self._pause_or_fail(error)
        self._reconnect()

    def _pause_or_fail(self, error: Exception) -> None:
        if isinstance(error, _Permanent):
            raise error
        if self.retries_left <= 0:
            what = str(error) if self.url in str(error) else f"{self.url}: {error}"
            raise RemoteReadError(f"{what} (after {self.io.retries} retries)") from error
        tried = self.io.retries - self.retries_left
        silent = time.monotonic() - self.waiting_since  # this try's wait so far
        time.sleep(max(0.0, min(FIRST_PAUSE_S * 2 ** tried, self.io.timeout_s - silent)))
        self.retries_left -= 1
        self.counts[IO_RETRIES] += 1
        self.waiting_since = time.monotonic()  # the next try's wait starts now


class _Body:
    """One try's byte source from some offset: read(n) ('' at its end), complete(pos), close()."""

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def complete(self, pos: int) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- http(s)
class _HttpSource:
    """Connects to an http(s) URL from a byte offset; remembers the file's length and ETag so that
    a retry never splices two versions of a file."""

    def __init__(self, url: str, io: ShardIO):
        self.url, self.io = url, io
        self.length: Optional[int] = None
        self.etag: Optional[str] = None

    def __call__(self, offset: int) -> "_HttpBody":
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if offset and self.etag:
            headers["If-Range"] = self.etag
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                          timeout=self.io.timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in RETRYABLE_STATUS:
                raise RemoteReadError(f"{self.url}: HTTP {e.code}") from None
            raise _Permanent(f"{self.url}: HTTP {e.code} {e.reason}", e.code) from None
        except urllib.error.URLError as e:  # refused, unreachable, a timeout while connecting
            raise RemoteReadError(f"{self.url}: {e.reason}") from None
        try:
            return self._body(resp, offset)
        except BaseException:
            resp.close()
            raise

    def _body(self, resp, offset: int) -> "_HttpBody":
        etag = resp.headers.get("ETag")
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:
                raise RemoteReadError(f"{self.url}: asked for byte {offset}, got {start}")
            skip = 0
        else:  # 200: the whole file (no Range support, or If-Range found another version)
            length = resp.headers.get("Content-Length")
            total, skip = (int(length) if length is not None else None), offset
        self._check_same_file(total, etag, offset)
        body = _HttpBody(resp, total)
        body.skip(skip)
        return body

    def _check_same_file(self, total: Optional[int], etag: Optional[str], offset: int) -> None:
        if offset and ((self.length is not None and total is not None and total != self.length)
                       or (self.etag and etag and etag != self.etag)):
            raise _Permanent(f"{self.url} changed while it was read (length {self.length} -> "
                             f"{total}, ETag {self.etag} -> {etag})")
        self.length = self.length if total is None else total
        self.etag = self.etag or etag


def _content_range(value: str):
    """'bytes 100-999/1000' -> (100, 1000); total None for '*'."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except ValueError:
        raise RemoteReadError(f"unreadable Content-Range {value!r}") from None


class _HttpBody(_Body):
    def __init__(self, resp, total: Optional[int]):
        self.resp, self.total = resp, total

    def skip(self, n: int) -> None:
        while n > 0:
            got = self.resp.read1(min(n, CHUNK))
            if not got:
                raise RemoteReadError("connection closed while skipping to the resume point")
            n -= len(got)

    def read(self, n: int) -> bytes:
        return self.resp.read1(n)  # one recv at most: a stall loses no byte already received

    def complete(self, pos: int) -> bool:
        # without a length (close-delimited), the end is the end; the tar reader sees a cut
        return self.total is None or pos >= self.total

    def close(self) -> None:
        self.resp.close()


# ----------------------------------------------------------------------------- pipe:
def _pipe_source(command: str, io: ShardIO) -> Callable[[int], "_PipeBody"]:
    def connect(offset: int) -> _PipeBody:
        body = _PipeBody(command, io.timeout_s)
        try:
            body.skip(offset)
        except BaseException:
            body.close()
            raise
        return body

    return connect


class _PipeBody(_Body):
    """A shell command's stdout; no byte for timeout_s, or a non-zero exit, is a failed try."""

    def __init__(self, command: str, timeout_s: float):
        self.command, self.timeout_s = command, timeout_s
        # its own process group: a stalled command is stopped with everything it started
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def read(self, n: int) -> bytes:
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout_s)
        if not ready:
            raise RemoteReadError(f"pipe:{self.command}: no output for {self.timeout_s} s")
        data = os.read(fd, n)
        if not data:
            code = self.proc.wait()
            if code != 0:
                raise RemoteReadError(f"pipe:{self.command}: exit status {code}")
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            got = self.read(min(n, CHUNK))
            if not got:
                raise RemoteReadError(f"pipe:{self.command}: ended before byte {n}")
            n -= len(got)

    def complete(self, pos: int) -> bool:
        return True  # read() raised already if the command failed

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group of our own child
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.proc.wait()

