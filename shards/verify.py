"""Check every shard of a manifest (local or in object storage): its size and SHA-256 match."""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from cil_dist import storage
from cil_dist.data.manifest import Manifest, ShardRef
from cil_dist.data.reading import HashingStream, ReadPolicy, ResumableStream, buffered, drain
from cil_dist.urls import redact_url

log = logging.getLogger(__name__)


def hash_stream(
    ref: ShardRef, policy: ReadPolicy, options: storage.StorageOptions | None = None
) -> tuple[str, int]:
    """SHA-256 and size of a shard, streamed with the reader's retries (nothing on disk)."""
    opener = functools.partial(storage.open_stream, options=options)
    hashing = HashingStream(ResumableStream(ref.url, policy, opener=opener), ref.url)
    with buffered(hashing, options) as stream:
        drain(stream)
    return hashing.content.sha256, hashing.content.size


def check_shard(
    ref: ShardRef,
    policy: ReadPolicy | None = None,
    options: storage.StorageOptions | None = None,
) -> str | None:
    """None if the shard matches its record, else a sentence naming the shard and the problem."""
    shown = redact_url(ref.url)
    try:
        digest, size = hash_stream(ref, policy or ReadPolicy(retries=2, backoff=0.5), options)
    except FileNotFoundError:
        return f"{shown}: missing"
    except PermissionError as exc:
        return f"{shown}: access denied: {redact_url(str(exc))}"
    except Exception as exc:  # OSError or a transport library's own error
        return f"{shown}: unreadable: {redact_url(f'{type(exc).__name__}: {exc}')}"
    if ref.bytes is not None and size != ref.bytes:
        return f"{shown}: {size} bytes, manifest says {ref.bytes}"
    if ref.sha256 and digest != ref.sha256:
        return f"{shown}: sha256 {digest} != manifest {ref.sha256}"
    return None


def verify_manifest(
    url: str, threads: int = 8, options: storage.StorageOptions | None = None
) -> list[str]:
    """Problems found in the shards of the manifest at ``url`` (empty when all are intact)."""
    manifest = Manifest.load(url, options)
    refs = manifest.shard_refs(list(manifest.splits))
    check = functools.partial(check_shard, options=options)
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in pool.map(check, refs) if p]
    log.info("verified %d shards of %s: %d bad", len(refs), redact_url(url), len(problems))
    return problems
