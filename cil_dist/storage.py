"""Paths and URLs behind one interface (fsspec), so local folders and object stores look alike.

Accepted everywhere a path is: local paths and ``file://``, ``http(s)://`` (plain or pre-signed),
``s3://`` (any S3-compatible endpoint, through s3fs) and ``gs://`` (through gcsfs). Credentials
come from the standard places of each store (``AWS_*`` variables, ``~/.aws``, instance roles;
Google's application default credentials); the only thing configured here is
:class:`StorageOptions` (an explicit S3 endpoint and the block size of ranged reads). It is
passed explicitly: every function that reaches a store takes ``options`` (None: the defaults),
so two endpoints can be used side by side in one process, and worker processes get the options
of whoever hands them work (they are picklable), not a process-wide setting.

Writers go through :func:`open_for_write`: a local file is written to a temporary name and
renamed into place, so a reader never sees a half-written file; object stores commit the object
when the stream closes (a write that fails is discarded, not committed). Anything shown to a
person goes through :func:`redact_url` first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import fsspec
import fsspec.asyn

from cil_dist.digest import ContentDigest
from cil_dist.urls import is_local, local_path, protocol_of, redact_url

if TYPE_CHECKING:
    from cil_dist.config import DataConfig

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
DEFAULT_BLOCK_SIZE = 8 << 20  # bytes per ranged GET: bounds the memory of one open stream
S3_PROTOCOLS = ("s3", "s3a")
S3_REQUEST_TRIES = 3  # s3fs's tries per S3 call (its default: 5), before data.read_retries
READ_TIMEOUT = 60.0  # seconds without a byte before an http(s) read fails (then is retried)

# scheme://[userinfo@]rest[?query][#fragment]: userinfo, query and fragment may carry secrets


_loop_at_fork: list[Any] = [None]


def _remember_io_loop() -> None:
    _loop_at_fork[0] = fsspec.asyn.loop[0]


def _forget_parent_io_loop() -> None:
    """In a forked child (a DataLoader worker): fsspec's I/O loop thread stayed behind in the
    parent, but its loop object still says "running". A filesystem inherited from the parent
    (an HTTP or S3 session) that is garbage-collected here then waits 1 s for that loop before
    closing its connections the direct way — a 1 s stall per worker and epoch. Mark the dead
    loop stopped so the direct way is taken at once."""
    loop, _loop_at_fork[0] = _loop_at_fork[0], None
    if loop is not None:
        loop._thread_id = None  # what asyncio's is_running() reads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_remember_io_loop, after_in_child=_forget_parent_io_loop)


@dataclass(frozen=True)
class StorageOptions:
    """How object stores are reached (frozen: hashable, picklable, handed to worker processes)."""

    endpoint_url: str = ""  # S3-compatible endpoint; "" = AWS_ENDPOINT_URL(_S3), ~/.aws, AWS
    block_size: int = DEFAULT_BLOCK_SIZE  # bytes fetched per ranged read

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> StorageOptions:
        """The options of a data config (``data.endpoint_url``, ``data.block_size``)."""
        return cls(endpoint_url=cfg.endpoint_url, block_size=cfg.block_size)


DEFAULTS = StorageOptions()


def filesystem(
    url: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``url`` (with the options' S3 endpoint) and its path."""
    options = options or DEFAULTS
    kwargs: dict[str, Any] = {}
    protocol = protocol_of(url)
    if protocol in S3_PROTOCOLS:
        # no botocore retries on top of s3fs's few quick ones: the reader's data.read_retries
        # and retry_backoff decide how long a failing store is waited for
        kwargs["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 1}}
        session = _s3_session()
        if session is not None:  # None: s3fs is missing, url_to_fs below says how to add it
            kwargs["session"] = session
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
    if protocol in ("http", "https"):  # a stalled transfer fails (and is retried), none hangs
        kwargs["client_kwargs"] = {"timeout": _http_timeout()}
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol_of(url))
        hint = f"; install it with `pip install cil-dist[{extra}]`" if extra else ""
        raise ImportError(f"{redact_url(url)}: {exc}{hint}") from None
    if protocol in S3_PROTOCOLS:
        # s3fs tries each call 5 times and a ranged read's call 5 times more (25 requests and
        # ~11 s of sleeps before a read fails); S3_REQUEST_TRIES bounds that to ~2 s
        fs.retries = S3_REQUEST_TRIES
    return fs, path


@functools.cache
def _s3_session() -> Any | None:
    """One aiobotocore session per process tree: a forked DataLoader worker inherits the
    service model it has loaded and makes its S3 client in half the time (50 vs 100 ms)."""
    try:
        from aiobotocore.session import AioSession
    except ImportError:
        return None
    return AioSession()


def _http_timeout():
    import aiohttp

    # no total limit (a large shard may stream for long), but no minute without a byte
    return aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT)


@contextlib.contextmanager
def open_for_write(
    url: str, mode: str = "wb", options: StorageOptions | None = None
) -> Iterator[IO]:
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
        fs, path = filesystem(url, options)
        stream = fs.open(path, mode)
        try:
            yield stream
        except BaseException:
            _discard(stream)
            raise
        stream.close()


def _discard(stream: IO) -> None:
    """Drop an unfinished upload (abort it; a single PUT is never sent) instead of committing
    what was written so far, as closing would."""
    with contextlib.suppress(Exception):
        stream.discard()
        stream.closed = True  # fsspec's files commit on close; this one must not


def exists(url: str, options: StorageOptions | None = None) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url, options)
    return fs.exists(path)


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as stream:
            return stream.read()
    options = options or DEFAULTS
    fs, path = filesystem(url, options)
    with fs.open(path, "rb", block_size=options.block_size) as stream:
        return stream.read()


def sha256_of(url: str, options: StorageOptions | None = None) -> tuple[str, int]:
    """SHA-256 hex digest and size in bytes of a file or object (streamed, not downloaded)."""
    content = ContentDigest()
    with open_stream(url, options=options) as stream:
        while chunk := stream.read(HASH_CHUNK):
            content.update(chunk)
    return content.sha256, content.size


def open_stream(
    url: str, offset: int = 0, size: int | None = None, options: StorageOptions | None = None
) -> IO[bytes]:
    """A forward-reading byte stream of ``url`` starting at ``offset`` (for resumed reads).

    Object stores are read in ranged blocks of ``block_size`` (bounded memory, no download to
    disk first); ``http(s)://`` is one streaming GET, resumed with a ``Range`` request (or, if
    the server ignores ranges, by discarding the first ``offset`` bytes); ``pipe:`` runs the
    command (it cannot resume). A known ``size`` (from a manifest) spares S3 the metadata request
    per open.
    """
    protocol = protocol_of(url)
    if protocol == "file":
        stream = open(local_path(url), "rb")  # noqa: SIM115 - the caller closes it
        stream.seek(offset)
        return stream
    if protocol == "pipe":
        if offset:
            raise OSError(f"{redact_url(url)}: a pipe: command cannot resume at byte {offset}")
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    options = options or DEFAULTS
    fs, path = filesystem(url, options)
    if protocol in ("http", "https"):
        return _open_http(fs, path, offset)
    known = size is not None and protocol in S3_PROTOCOLS
    extra = {"size": size} if known else {}
    stream = fs.open(path, "rb", block_size=options.block_size, cache_type="readahead", **extra)
    if known:  # else s3fs asks for them (a HEAD request) on the first ranged GET of every open
        stream.details = {"name": path, "size": size, "type": "file"}
    if offset:
        stream.seek(offset)
    return stream


def _open_http(fs: fsspec.AbstractFileSystem, url: str, offset: int) -> IO[bytes]:
    """One streaming GET. Built directly: ``fs.open`` would first probe the size with HEAD and
    GET and turn every failure (refused connection, 403, 503) into FileNotFoundError."""
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    headers = {"Range": f"bytes={offset}-"} if offset else {}
    session = sync(fs.loop, fs.set_session)
    stream = HTTPStreamFile(fs, url, mode="rb", loop=fs.loop, session=session, headers=headers)
    if offset and getattr(getattr(stream, "r", None), "status", 206) != 206:
        skip = offset  # the server ignored the range: read and drop what was already delivered
        while skip:
            dropped = stream.read(min(skip, HASH_CHUNK))
            if not dropped:
                raise OSError(f"{redact_url(url)}: ended before byte {offset} on resume")
            skip -= len(dropped)
    return stream


def check_readable(url: str, options: StorageOptions | None = None) -> str | None:
    """None when ``url`` can be opened and read, else one line saying why not (redacted)."""
    shown = redact_url(url)
    try:
        with open_stream(url, options=options) as stream:
            stream.read(1)
    except FileNotFoundError:
        return f"{shown}: not found"
    except PermissionError as exc:
        return f"{shown}: access denied (check credentials): {redact_url(str(exc))}"
    except ImportError as exc:
        return str(exc)
    except Exception as exc:  # any transport failure is a reason, not a crash
        return f"{shown}: not reachable: {type(exc).__name__}: {redact_url(str(exc))}"
    return None
