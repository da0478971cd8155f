"""Reading one shard: open the URL, stream its tar members, group them into samples.

Shards are opened through :func:`cil_dist.storage.open_stream` (local files, ``pipe:``,
``http(s)://``, ``s3://``, ``gs://``) and read as streams with bounded memory. A transport
failure mid-shard (connection reset, server restart, time-out, premature end) re-opens the shard
at the byte offset reached, after a back-off, at most ``ReadPolicy.retries`` times per shard, so
every sample is yielded once and the checksum still covers every byte. While the tar streams,
its bytes are hashed; at the end the sample count and the SHA-256 are checked against the
manifest, so a truncated, corrupt or replaced shard is reported with its URL instead of silently
shortening an epoch. When the retries are exhausted, ``on_error="skip"`` skips the rest of the
shard and reports the number of samples lost through a callback (never silently).
"""

from __future__ import annotations

import collections
import functools
import importlib
import io
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from cil_dist import storage, urls
from cil_dist.data.manifest import ShardRef
from cil_dist.data.shardlist import ShardSlice
from cil_dist.digest import ContentDigest
from cil_dist.urls import redact_url

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
READ_BUFFER = 1 << 20  # bytes per transport read under the tar reader
ON_ERROR = ("fail", "skip")
_STREAM_REPR = re.compile(r" @ <[^>]*>")
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a failed transfer that a re-open may cure."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, EOFError]
    try:
        import aiohttp

        errors += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
        errors += [aiohttp.ClientResponseError]  # by status, see is_transient
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        pass
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:  # s3fs not installed
        pass
    return tuple(errors)


TRANSIENT = _transient_errors()


def is_transient(exc: BaseException) -> bool:
    """True for a failed transfer worth re-opening (not a missing object or a refusal)."""
    if isinstance(exc, PERMANENT):
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError: HTTP status
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return isinstance(exc, TRANSIENT)


@dataclass(frozen=True)
class ReadPolicy:
    """What to do when a shard's transfer fails."""

    retries: int = 5  # re-opens per shard (resuming at the byte offset) before giving up
    backoff: float = 1.0  # seconds before the first re-open; doubles with every further one
    on_error: str = "fail"  # fail | skip: what happens when the retries are exhausted

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_shard_error: expected one of {ON_ERROR}, got {self.on_error!r}")
        if self.retries < 0 or self.backoff < 0:
            raise ValueError("read_retries and retry_backoff must be >= 0")


def one_line(text: str) -> str:
    """``text`` redacted (:func:`cil_dist.urls.redact_url`) and on one line, without the
    ``@ <stream repr>`` that webdataset appends to tar errors (the shard is named anyway)."""
    return " ".join(_STREAM_REPR.sub("", redact_url(text)).split())


def failure(exc: BaseException) -> str:
    """A transport error in words: "not found", "access denied" or its type and message."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError: the HTTP status
    if isinstance(exc, PermissionError) or status in (401, 403):
        return f"access denied{f' (HTTP {status})' if status else ''}; check credentials"
    if isinstance(exc, RetriesExhaustedError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ShardReadError(RuntimeError):
    """A shard could not be read; names the shard URL (redacted), the sample being read and the
    last one read whole.

    Only redacted text is kept (the attributes too), so pickling or printing it, with or
    without a traceback, shows no credentials.
    """

    def __init__(self, url: str, last_key: str | None, reason: str, current_key: str | None = None):
        self.url, self.last_key, self.reason = redact_url(url), last_key, one_line(reason)
        self.current_key = current_key if current_key != last_key else None
        super().__init__(f"shard {self.url}: {self.reason} ({self._where()})")

    def _where(self) -> str:
        after = f"after sample {self.last_key!r}" if self.last_key else ""
        if self.current_key:
            return f"at sample {self.current_key!r}, " + (after or "the shard's first")
        return after or "before its first sample"

    def __reduce__(self):  # rebuilt from its parts when crossing from a DataLoader worker
        return type(self), (self.url, self.last_key, self.reason, self.current_key)


class ShardChecksumError(ShardReadError):
    """A shard's bytes do not match the SHA-256 or size recorded in the manifest."""


class RetriesExhaustedError(OSError):
    """A shard's transfer kept failing; raised by :class:`ResumableStream`."""


class ResumableStream:
    """A read-only stream of ``url`` that re-opens at its byte offset after transfer failures.

    ``expected_size`` (from the manifest) turns an early end of stream into a failure too (a
    server that restarts may close the connection cleanly).
    """

    def __init__(
        self,
        url: str,
        policy: ReadPolicy,
        expected_size: int | None = None,
        opener: Callable[[str, int], IO[bytes]] = storage.open_stream,
    ):
        self.url, self.policy, self.expected_size, self.opener = url, policy, expected_size, opener
        self.position = 0
        self.reopens = 0
        self.raw: IO[bytes] | None = None
        self._attempt(lambda: b"")

    def _attempt(self, action: Callable[[], bytes]) -> bytes:
        while True:
            try:
                if self.raw is None:
                    self.raw = self.opener(self.url, self.position)
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._recover(exc)

    def _recover(self, exc: BaseException) -> None:
        self._close_raw()
        reason = redact_url(f"{type(exc).__name__}: {exc}")
        if self.reopens >= self.policy.retries:
            raise RetriesExhaustedError(
                f"gave up at byte {self.position} after {self.reopens} retries: {reason}"
            ) from None  # the transport's error may hold the URL with its credentials
        self.reopens += 1
        delay = self.policy.backoff * 2 ** (self.reopens - 1)
        log.warning(
            "shard %s: %s at byte %d; re-opening in %.2f s (retry %d of %d)",
            redact_url(self.url),
            reason,
            self.position,
            delay,
            self.reopens,
            self.policy.retries,
        )
        time.sleep(delay)

    def _read_once(self, n: int) -> bytes:
        data = self.raw.read(n)
        short = self.expected_size is not None and self.position < self.expected_size
        if not data and n != 0 and short:
            raise ConnectionError(f"stream ended at byte {self.position} of {self.expected_size}")
        return data

    def read(self, n: int = -1) -> bytes:
        data = self._attempt(lambda: self._read_once(n))
        self.position += len(data)
        return data

    def _close_raw(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception as exc:  # a failed transfer may also fail to close
                log.debug("closing %s after a failure: %s", redact_url(self.url), exc)

    def close(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            raw.close()


class HashingStream(io.RawIOBase):
    """A read-only raw stream that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes], url: str = ""):
        super().__init__()
        self.raw = raw
        self.url = url
        self.content = ContentDigest()

    @property
    def name(self) -> str:  # shown by the buffered reader's repr in webdataset's tar errors
        return redact_url(self.url)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        data = self.raw.read(len(buffer))
        self.content.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.raw.close()
            finally:
                super().close()

    def __str__(self) -> str:  # webdataset appends the stream's str() to tar errors
        return redact_url(self.url)


def buffered(
    stream: HashingStream, options: storage.StorageOptions | None = None
) -> io.BufferedReader:
    """Big reads underneath the tar reader's 10 KiB records: one transport call per MiB (or per
    ranged block of an object store, if the options' ``block_size`` is smaller)."""
    size = READ_BUFFER
    if urls.protocol_of(stream.url) not in ("file", "pipe", "http", "https"):
        size = min(size, (options or storage.DEFAULTS).block_size)
    return io.BufferedReader(stream, buffer_size=size)


def drain(stream: IO[bytes]) -> None:
    """Read (and so hash) whatever the tar reader left unread, e.g. end-of-archive padding."""
    collections.deque(iter(functools.partial(stream.read, READ_CHUNK), b""), maxlen=0)


def open_shard(
    url: str,
    policy: ReadPolicy | None = None,
    size: int | None = None,
    options: storage.StorageOptions | None = None,
):
    """Open a shard URL for streaming reads, resumable after transfer failures.

    ``size`` makes an early end of a remote stream a retried failure; a short local file or
    ``pipe:`` output is what it is, and reported as truncated. ``options``: how object stores
    are reached (None: the defaults).
    """
    remote = urls.protocol_of(url) not in ("file", "pipe")
    if not remote:
        return ResumableStream(url, policy or ReadPolicy())
    opener = functools.partial(storage.open_stream, size=size, options=options)
    return ResumableStream(url, policy or ReadPolicy(), size, opener)


def _member_stream(stream: IO[bytes], url: str, seen: list[str]) -> Iterator[dict[str, Any]]:
    """The tar's members; ``seen[0]`` is the key of the last one read (the sample underway)."""
    for member in tar_file_iterator(stream):
        member["__url__"] = url
        seen[0] = base_plus_ext(member["fname"])[0] or ""
        yield member


def iter_shard(
    ref: ShardRef,
    verify: bool = True,
    policy: ReadPolicy | None = None,
    options: storage.StorageOptions | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard (dicts of raw member bytes plus ``__key__``, ``__url__``).

    With ``verify`` and a manifest record, the sample count, byte size and SHA-256 are checked
    once the shard is read to the end; a mismatch raises :class:`ShardChecksumError`.
    """
    last_key: str | None = None
    count = 0
    try:
        raw = open_shard(ref.url, policy, ref.bytes, options)
    except Exception as exc:  # a refusal (403), a missing object, a transport library's error
        raise ShardReadError(ref.url, None, f"cannot open: {failure(exc)}") from None
    hashing = HashingStream(raw, ref.url)
    stream = buffered(hashing, options)
    seen = [""]  # key of the last member read
    completed = False

    def error(reason: str) -> ShardReadError:
        return ShardReadError(ref.url, last_key, reason, seen[0] or None)

    try:
        for sample in group_by_keys(_member_stream(stream, ref.url, seen)):
            last_key = sample["__key__"]
            count += 1
            yield sample
        drain(stream)
        completed = True
    except RetriesExhaustedError as exc:
        raise error(f"transfer failed: {exc}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise error(f"unreadable or truncated tar: {exc}") from None
    except Exception as exc:  # a refusal mid-stream, a transport library's own error
        raise error(f"read failed: {failure(exc)}") from None
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe (curl, pipe:) reports a failed transfer at close
            if completed:
                raise ShardReadError(ref.url, last_key, f"stream failed: {exc}") from None
            log.debug("closing %s early: %s", redact_url(ref.url), exc)
    if not verify:
        return
    if ref.samples is not None and count != ref.samples:
        raise ShardChecksumError(
            ref.url, last_key, f"holds {count} samples, the manifest says {ref.samples}"
        )
    if ref.bytes is not None and hashing.content.size != ref.bytes:
        raise ShardChecksumError(
            ref.url, last_key, f"is {hashing.content.size} bytes, the manifest says {ref.bytes}"
        )
    if ref.sha256 and hashing.content.sha256 != ref.sha256:
        raise ShardChecksumError(
            ref.url,
            last_key,
            f"sha256 {hashing.content.sha256} does not match the manifest's {ref.sha256}",
        )


SkipReport = Callable[[ShardSlice, int | None, ShardReadError], None]


def iter_slice(
    piece: ShardSlice,
    verify: bool = True,
    policy: ReadPolicy | None = None,
    on_skip: SkipReport | None = None,
    options: storage.StorageOptions | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of a shard slice: every ``stride``-th sample from ``offset``.

    Under ``policy.on_error == "skip"`` a shard whose reading fails (retries exhausted,
    unreadable tar) ends the slice early: the number of its samples not yielded (None when the
    shard's count is unknown) is logged and passed to ``on_skip``. Checksum mismatches always
    raise: the data itself is wrong.
    """
    policy = policy or ReadPolicy()
    delivered = 0
    try:
        for index, sample in enumerate(iter_shard(piece.ref, verify, policy, options)):
            if index % piece.stride == piece.offset:
                delivered += 1
                yield sample
    except ShardChecksumError:
        raise
    except ShardReadError as exc:
        if policy.on_error != "skip":
            raise
        missing = piece.samples - delivered if piece.ref.samples is not None else None
        log.warning(
            "on_shard_error=skip: skipping the rest of %s: %s samples skipped (%s)",
            redact_url(piece.ref.url),
            "an unknown number of" if missing is None else missing,
            exc,
        )
        if on_skip is not None:
            on_skip(piece, missing, exc)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """webdataset ``gopen`` handler for object stores, so vanilla ``WebDataset(url)`` works
    (with the default :class:`~cil_dist.storage.StorageOptions`)."""
    if mode.startswith("r"):
        return storage.open_stream(url)
    fs, path = storage.filesystem(url)
    return fs.open(path, mode)


# module level: every process importing the reader (DataLoader workers included) has them
_GOPEN_SCHEMES = importlib.import_module("webdataset.gopen").gopen_schemes
for _scheme in ("s3", "s3a", "gs", "gcs"):
    _GOPEN_SCHEMES[_scheme] = _gopen_fsspec
