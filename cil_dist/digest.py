"""What a manifest records of a shard's bytes — SHA-256 and size — computed one way for the
writer (``cil-shards pack``), the streaming reader (training, ``verify``) and whole objects."""

from __future__ import annotations

import hashlib


class ContentDigest:
    """SHA-256 and byte count of the bytes passed to :meth:`update`, in order."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()
