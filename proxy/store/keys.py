"""Store key syntax, shared by every backend: `/`-separated DNS-safe segments.

Only validation lives here; what the keys mean is store/records.py.
"""

from __future__ import annotations

import re

from proxy.errors import StoreError

SEGMENT = re.compile(r"[a-z0-9._*-]{1,250}")
MAX_KEY = 1024  # keeps a file-store log line far below its 4 KiB tail window


def split_key(key: str) -> list[str]:
    """The segments of `key`; StoreError naming the key when it is not valid."""
    parts = key.split("/")
    if len(key) > MAX_KEY or not all(SEGMENT.fullmatch(p) and p not in (".", "..")
                                     for p in parts):
        raise StoreError(f"invalid store key {key[:80]!r}: use '/'-separated segments of "
                         f"a-z 0-9 . _ * - (1-250 characters, not '.' or '..')")
    return parts


def check_prefix(prefix: str) -> None:
    """A scan/watch prefix: whole segments, then possibly the start of one."""
    head, slash, last = prefix.rpartition("/")
    if slash:
        split_key(head)
    if last and not SEGMENT.fullmatch(last):
        raise StoreError(f"invalid store prefix {prefix[:80]!r}")
