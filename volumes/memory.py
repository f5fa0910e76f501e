"""MemoryBackend: a sparse in-memory :class:`volumes.sbc.BlockBackend` (tests, scratch LUs).

Data lives in fixed-size pages allocated on first write; a page that was never written or was
discarded whole reads as zeros and is reported as deallocated by ``extents``. A discard that
covers part of a page zeroes that part and keeps the page (like a hole punch on a file system
with ``page``-sized blocks).
"""

from __future__ import annotations

from typing import Iterator


class MemoryBackend:
    """A sparse byte array of ``size`` bytes, ``page`` bytes per allocation unit."""

    def __init__(self, size: int, *, page: int = 4096) -> None:
        if size < 0 or page <= 0:
            raise ValueError("size must be >= 0 and page > 0")
        self._size = size
        self.page = page
        self.pages: dict[int, bytearray] = {}
        self.flushes = 0  # how many times flush() ran (tests check FUA / SYNCHRONIZE CACHE)

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside 0..{self._size}")

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(page index, start in page, bytes) covering the range."""
        pos, end = offset, offset + length
        while pos < end:
            index, start = divmod(pos, self.page)
            n = min(self.page - start, end - pos)
            yield index, start, n
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray(length)
        at = 0
        for index, start, n in self._spans(offset, length):
            page = self.pages.get(index)
            if page is not None:
                out[at:at + n] = page[start:start + n]
            at += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        view = memoryview(data).cast("B")
        at = 0
        for index, start, n in self._spans(offset, len(view)):
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = bytearray(self.page)
            page[start:start + n] = view[at:at + n]
            at += n

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for index, start, n in self._spans(offset, length):
            if n == self.page:
                self.pages.pop(index, None)
            elif index in self.pages:
                self.pages[index][start:start + n] = bytes(n)

    def flush(self) -> None:
        self.flushes += 1

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        end = offset + length
        first, last = offset // self.page, -(-end // self.page)
        out: list[tuple[int, int, bool]] = []
        pos = offset
        for index in sorted(i for i in self.pages if first <= i < last):
            lo, hi = max(index * self.page, offset), min((index + 1) * self.page, end)
            if lo > pos:
                out.append((pos, lo - pos, False))
            if out and out[-1][2] and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0], True)
            else:
                out.append((lo, hi - lo, True))
            pos = hi
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    @property
    def allocated_bytes(self) -> int:
        return len(self.pages) * self.page

    def close(self) -> None:
        self.pages.clear()
