"""XDR (RFC 4506): the external data representation under ONC RPC, NFS and MOUNT.

Pure code: a :class:`Packer` appends big-endian 4-byte-aligned items to a buffer; an
:class:`Unpacker` reads them from bytes and raises :class:`XdrError` (never IndexError or
struct.error) on anything short, oversized or malformed, so a decoder fed arbitrary bytes fails
only with our own error (the RPC layer answers GARBAGE_ARGS).

Invariants: every variable-length item is checked against the bytes left *and* against the
caller's maximum before it is sliced; padding is zero on the wire (we write zeros and accept
any padding on input, as RFC 4506 4.10 readers commonly do).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
assert _U32.size == 4 and _U64.size == 8

MAX_OPAQUE = 1 << 24
"""Default cap of a variable-length item (16 MiB): larger than any RPC record we accept."""


class XdrError(ValueError):
    """The bytes are not a valid XDR encoding of what was asked for."""


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


class Packer:
    """Appends XDR items; ``bytes()`` / :meth:`getvalue` gives the encoding."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def __bytes__(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def uint(self, value: int) -> None:
        self._buf += _U32.pack(value)

    def int(self, value: int) -> None:
        self._buf += _I32.pack(value)

    def uhyper(self, value: int) -> None:
        self._buf += _U64.pack(value)

    def hyper(self, value: int) -> None:
        self._buf += _I64.pack(value)

    def bool(self, value: bool) -> None:
        self._buf += _U32.pack(1 if value else 0)

    def enum(self, value: int) -> None:
        self._buf += _I32.pack(int(value))

    def fopaque(self, data: bytes | bytearray | memoryview, size: int) -> None:
        """Fixed-length opaque of exactly ``size`` bytes."""
        if len(data) != size:
            raise XdrError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self._buf += data
        self._buf += b"\0" * _pad(size)

    def opaque(self, data: bytes | bytearray | memoryview) -> None:
        """Variable-length opaque: length, bytes, padding."""
        n = len(data)
        self._buf += _U32.pack(n)
        self._buf += data
        self._buf += b"\0" * _pad(n)

    def string(self, text: str | bytes) -> None:
        self.opaque(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        """Already-encoded XDR (must be 4-byte aligned)."""
        if len(data) % 4:
            raise XdrError("raw XDR must be a multiple of 4 bytes")
        self._buf += data

    def array(self, items: list[_T], pack_item: Callable[[_T], None]) -> None:
        """Counted array: count, then each item."""
        self.uint(len(items))
        for item in items:
            pack_item(item)

    def optional(self, item: _T | None, pack_item: Callable[[_T], None]) -> None:
        """``*item`` (optional-data): a bool, then the item when present."""
        if item is None:
            self.bool(False)
        else:
            self.bool(True)
            pack_item(item)


class Unpacker:
    """Reads XDR items from ``data``; every read checks the bytes left."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self._pos = pos

    @property
    def pos(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        """Everything not read yet (consumes it)."""
        out = bytes(self._data[self._pos:])
        self._pos = len(self._data)
        return out

    def done(self) -> None:
        """Raise unless every byte was consumed (trailing garbage is GARBAGE_ARGS)."""
        if self._pos != len(self._data):
            raise XdrError(f"{len(self._data) - self._pos} trailing bytes")

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise XdrError(f"need {n} bytes at offset {self._pos}, have {self.remaining()}")
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out

    def uint(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def int(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def uhyper(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def hyper(self) -> int:
        return int(_I64.unpack(self._take(8))[0])

    def bool(self) -> bool:
        value = self.uint()
        if value > 1:
            raise XdrError(f"bool must be 0 or 1, got {value}")
        return value == 1

    def enum(self) -> int:
        return self.int()

    def fopaque(self, size: int) -> bytes:
        data = self._take(size)
        self._take(_pad(size))
        return data

    def opaque(self, max_size: int = MAX_OPAQUE) -> bytes:
        n = self.uint()
        if n > max_size:
            raise XdrError(f"opaque of {n} bytes exceeds the maximum {max_size}")
        return self.fopaque(n)

    def string(self, max_size: int = MAX_OPAQUE) -> str:
        """A string as text (UTF-8; undecodable bytes kept with surrogateescape)."""
        return self.opaque(max_size).decode("utf-8", "surrogateescape")

    def array(self, unpack_item: Callable[[], _T], max_items: int = 1 << 16) -> list[_T]:
        n = self.uint()
        if n > max_items:
            raise XdrError(f"array of {n} items exceeds the maximum {max_items}")
        if n > self.remaining():  # every XDR item takes at least 4 bytes... or 1 for safety
            raise XdrError(f"array of {n} items cannot fit in {self.remaining()} bytes")
        return [unpack_item() for _ in range(n)]

    def optional(self, unpack_item: Callable[[], _T]) -> _T | None:
        return unpack_item() if self.bool() else None
