"""Check every shard of a manifest: it exists, and its size and SHA-256 match."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from cil_dist import storage
from cil_dist.data.manifest import Manifest, ShardRef

log = logging.getLogger(__name__)


def check_shard(ref: ShardRef) -> str | None:
    """None if the shard matches its record, else a sentence naming the shard and the problem."""
    try:
        digest, size = storage.sha256_of(ref.url)
    except FileNotFoundError:
        return f"{ref.url}: missing"
    except OSError as exc:
        return f"{ref.url}: unreadable: {exc}"
    if ref.bytes is not None and size != ref.bytes:
        return f"{ref.url}: {size} bytes, manifest says {ref.bytes}"
    if ref.sha256 and digest != ref.sha256:
        return f"{ref.url}: sha256 {digest} != manifest {ref.sha256}"
    return None


def verify_manifest(url: str, threads: int = 8) -> list[str]:
    """Problems found in the shards of the manifest at ``url`` (empty when all are intact)."""
    manifest = Manifest.load(url)
    refs = manifest.shard_refs(list(manifest.splits))
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in pool.map(check_shard, refs) if p]
    log.info("verified %d shards of %s: %d bad", len(refs), url, len(problems))
    return problems
