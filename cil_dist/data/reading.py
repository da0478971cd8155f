"""Reading one shard: open the URL, stream its tar members, group them into samples.

Opening goes through webdataset's ``gopen`` (local files, ``pipe:``, ``http(s)://`` via curl).
While the tar streams, its bytes are hashed; at the end the sample count and the SHA-256 are
checked against the manifest, so a truncated, corrupt or replaced shard is reported with its
URL instead of silently shortening an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from cil_dist.data.manifest import ShardRef
from cil_dist.data.shardlist import ShardSlice

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16


class ShardReadError(RuntimeError):
    """A shard could not be read; names the shard URL and the last sample key read."""

    def __init__(self, url: str, last_key: str | None, reason: str):
        where = f"after sample {last_key!r}" if last_key else "before its first sample"
        super().__init__(f"shard {url}: {reason} ({where})")
        self.url, self.last_key, self.reason = url, last_key, reason


class ShardChecksumError(ShardReadError):
    """A shard's bytes do not match the SHA-256 or size recorded in the manifest."""


class HashingStream:
    """A read-only stream wrapper that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever the tar reader left unread, e.g. end-of-archive padding."""
        while self.read(READ_CHUNK):
            pass

    def close(self) -> None:
        self.raw.close()


def open_shard(url: str) -> IO[bytes]:
    """Open a shard URL for streaming reads."""
    return gopen(url, "rb")


def _member_stream(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    for member in tar_file_iterator(stream):
        member["__url__"] = url
        yield member


def iter_shard(ref: ShardRef, verify: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard (dicts of raw member bytes plus ``__key__``, ``__url__``).

    With ``verify`` and a manifest record, the sample count, byte size and SHA-256 are checked
    once the shard is read to the end; a mismatch raises :class:`ShardChecksumError`.
    """
    last_key: str | None = None
    count = 0
    try:
        raw = open_shard(ref.url)
    except OSError as exc:
        raise ShardReadError(ref.url, None, f"cannot open: {exc}") from exc
    stream = HashingStream(raw)
    completed = False
    try:
        for sample in group_by_keys(_member_stream(stream, ref.url)):
            last_key = sample["__key__"]
            count += 1
            yield sample
        stream.drain()
        completed = True
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShardReadError(ref.url, last_key, f"unreadable or truncated tar: {exc}") from exc
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe (curl, pipe:) reports a failed transfer at close
            if completed:
                raise ShardReadError(ref.url, last_key, f"stream failed: {exc}") from exc
            log.debug("closing %s early: %s", ref.url, exc)
    if not verify:
        return
    if ref.samples is not None and count != ref.samples:
        raise ShardChecksumError(
            ref.url, last_key, f"holds {count} samples, the manifest says {ref.samples}"
        )
    if ref.bytes is not None and stream.size != ref.bytes:
        raise ShardChecksumError(
            ref.url, last_key, f"is {stream.size} bytes, the manifest says {ref.bytes}"
        )
    if ref.sha256 and stream.digest.hexdigest() != ref.sha256:
        raise ShardChecksumError(
            ref.url,
            last_key,
            f"sha256 {stream.digest.hexdigest()} does not match the manifest's {ref.sha256}",
        )


def iter_slice(piece: ShardSlice, verify: bool = True) -> Iterator[dict[str, Any]]:
    """The samples of a shard slice: every ``stride``-th sample from ``offset``."""
    for index, sample in enumerate(iter_shard(piece.ref, verify)):
        if index % piece.stride == piece.offset:
            yield sample
