"""URLs and paths: which transport a location uses, joining and parents for local paths and
URLs alike, and the redaction that keeps credentials (user info, pre-signed query strings) out
of every message, log and file."""

from __future__ import annotations

import os
import posixpath
import re

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@?#]*@)?(?P<rest>[^\s?#'\"]*)")
_URL_TAIL = re.compile(r"[?#][^\s'\"]*?(?P<punct>[:;,.)\]]*)(?=[\s'\"]|$)")


def redact_url(text: str) -> str:
    """``text`` with user info, query strings and fragments removed from every URL in it.

    ``https://h/b/k.tar?X-Amz-Signature=…`` → ``https://h/b/k.tar``; ``s3://key:secret@b/k``
    → ``s3://b/k``. Plain paths are returned unchanged.
    """
    if "://" not in text:
        return text
    out, pos = [], 0
    for match in _URL.finditer(text):
        out.append(text[pos : match.start()])
        out.append(match.group("scheme") + match.group("rest"))
        tail = _URL_TAIL.match(text, match.end())
        if tail:  # drop the query/fragment, keep punctuation of the sentence after it
            out.append(tail.group("punct"))
        pos = tail.end() if tail else match.end()
    out.append(text[pos:])
    return "".join(out)


def protocol_of(url: str) -> str:
    """``"file"`` for plain paths, else the URL scheme (``s3``, ``https``, ``pipe``, …)."""
    if url.startswith("pipe:"):
        return "pipe"
    return url.split("://", 1)[0].lower() if "://" in url else "file"


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
