"""CDB builders and result checks for the SBC tests (byte-level, no library in between)."""

from __future__ import annotations

import struct

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import DecodedSense

NEXUS = "iqn.2025-01.org.vtl.test:init,i,0x1"


def run(dev: object, cdb: bytes, data: bytes = b"", *, expected_in: int = 0,
        nexus: str = NEXUS) -> ScsiResult:
    return dev.execute(ScsiCommand(0, bytes(cdb), data, expected_in=expected_in,  # type: ignore[attr-defined]
                                   nexus=nexus))


def clear_ua(dev: object, nexus: str = NEXUS) -> None:
    """The first command of a nexus reports POWER ON, RESET; consume it."""
    res = run(dev, read_capacity10(), nexus=nexus)
    if not res.ok:
        assert sense(res)[:3] == (0x6, 0x29, 0x00)


def sense(res: ScsiResult) -> tuple[int, int, int]:
    assert res.status == ScsiStatus.CHECK_CONDITION, res
    s = DecodedSense.decode(res.sense)
    return s.key, s.asc, s.ascq


def info(res: ScsiResult) -> int:
    return DecodedSense.decode(res.sense).information


def read6(lba: int, blocks: int) -> bytes:
    return bytes([0x08, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0])


def write6(lba: int, blocks: int) -> bytes:
    return bytes([0x0A, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0])


def cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, 0, blocks, 0)


def cdb12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb10(0x28, lba, blocks, flags)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb10(0x2A, lba, blocks, flags)


def read_capacity10(lba: int = 0, pmi: int = 0) -> bytes:
    return struct.pack(">BBIHBB", 0x25, 0, lba, 0, pmi, 0)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def unmap_cdb(plen: int, anchor: int = 0) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, anchor, 0, plen, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def compare_and_write(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks & 0xFF, 0, 0)
