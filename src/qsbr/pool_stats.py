"""What BufferPool.stats() returns: a frozen snapshot of the pool."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PoolStats", "ClassStats"]


@dataclass(frozen=True)
class ClassStats:
    block_size: int
    #: Blocks handed out, released but waiting for their grace period, and
    #: free for reuse.
    in_use: int
    waiting: int
    free: int


@dataclass(frozen=True)
class PoolStats:
    pages: int
    page_size: int
    #: Bytes the pool holds (its pages and its large blocks), and the cap
    #: (None: no cap).
    bytes: int
    max_bytes: int | None
    #: block size -> its blocks in use / waiting / free.
    classes: dict[int, ClassStats]
    #: Bytes of blocks in views not yet released, of blocks released and
    #: waiting for a grace period, and of blocks free for reuse (carved or
    #: not yet: a page's uncarved room counts as free).
    bytes_out: int = 0
    bytes_waiting: int = 0
    bytes_free: int = 0
    #: Requests above the largest size class, each served by a block of its
    #: own: how many are out or waiting now, and their bytes.
    large_blocks: int = 0
    large_bytes: int = 0
    #: Pages given back (by trim(), or trimmed by the pool after staying free).
    trimmed_pages: int = 0
    #: acquire() calls that waited for room under max_bytes, and those that
    #: raised PoolExhaustedError.
    full_waits: int = 0
    exhausted: int = 0
    closed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        """``stats["pages"]``: the fields, read as a mapping too."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)
