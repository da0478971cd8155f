"""Paths and URLs behind one interface (fsspec), so local folders and object stores look alike.

Writers go through :func:`open_for_write`: a local file is written to a temporary name and
renamed into place, so a reader never sees a half-written file; other filesystems (s3://, gs://)
commit the object when the stream closes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO

import fsspec

HASH_CHUNK = 1 << 20


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return posixpath.join(base, *parts)


def parent(url: str) -> str:
    """The folder holding ``url``."""
    if is_local(url):
        return os.path.dirname(os.path.abspath(local_path(url)))
    return url.rsplit("/", 1)[0]


@contextlib.contextmanager
def open_for_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``url`` for writing; the file appears only once the block completes."""
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, mode) as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        with fsspec.open(url, mode) as stream:
            yield stream


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as stream:
            return stream.read()
    with fsspec.open(url, "rb") as stream:
        return stream.read()


def sha256_of(url: str) -> tuple[str, int]:
    """SHA-256 hex digest and size in bytes of a file or object."""
    digest, size = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
