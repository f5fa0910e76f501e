"""A small in-memory SBC disk implementing the ScsiDevice protocol, for driving the iSCSI target
with real initiators. Deliberately independent of vtl.scsi devices: it tests the transport."""

from __future__ import annotations

import struct

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus

BLOCK = 512


def _sense(key: int, asc: int, ascq: int) -> bytes:
    s = bytearray(18)
    s[0], s[2], s[7], s[12], s[13] = 0x70, key, 10, asc, ascq
    return bytes(s)


def _check(key: int, asc: int, ascq: int, expected: int | None = None) -> ScsiResult:
    return ScsiResult(ScsiStatus.CHECK_CONDITION, b"", _sense(key, asc, ascq), expected)


class FakeDisk:
    """LUN 0 only. Records resets and lost nexuses so tests can observe them."""

    def __init__(self, blocks: int = 2048) -> None:
        self.blocks = blocks
        self.data = bytearray(blocks * BLOCK)
        self.lost: list[str] = []
        self.resets: list[str] = []
        self.commands: list[ScsiCommand] = []

    # ScsiDevice protocol -------------------------------------------------------------------
    def has_lun(self, lun: int) -> bool:
        return lun == 0

    def reset_lun(self, lun: int) -> None:
        self.resets.append(f"lun{lun}")

    def reset_target(self, cold: bool) -> None:
        self.resets.append("cold" if cold else "warm")

    def nexus_lost(self, nexus: str) -> None:
        self.lost.append(nexus)

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        self.commands.append(cmd)
        cdb = bytes(cmd.cdb)
        op = cdb[0]
        if op == 0xA0:  # REPORT LUNS
            alloc = struct.unpack_from(">I", cdb, 6)[0]
            return ScsiResult(data_in=(struct.pack(">I4x", 8) + bytes(8))[:alloc])
        if cmd.lun != 0:
            if op == 0x12:
                return ScsiResult(data_in=bytes([0x7F]) + bytes(35))
            return _check(0x05, 0x25, 0x00)
        if op == 0x00:  # TEST UNIT READY
            return ScsiResult()
        if op == 0x12:
            return self._inquiry(cdb)
        if op == 0x25:  # READ CAPACITY(10)
            return ScsiResult(data_in=struct.pack(">II", self.blocks - 1, BLOCK))
        if op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16)
            alloc = struct.unpack_from(">I", cdb, 10)[0]
            data = struct.pack(">QI", self.blocks - 1, BLOCK) + bytes(20)
            return ScsiResult(data_in=data[:alloc])
        if op in (0x1A, 0x5A):  # MODE SENSE(6/10): header only
            if op == 0x1A:
                return ScsiResult(data_in=bytes([3, 0, 0, 0])[:cdb[4]])
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            return ScsiResult(data_in=bytes([0, 6, 0, 0, 0, 0, 0, 0])[:alloc])
        if op == 0x35:  # SYNCHRONIZE CACHE(10)
            return ScsiResult()
        rw = self._decode_rw(cdb)
        if rw is not None:
            return self._rw(cmd, *rw)
        return _check(0x05, 0x20, 0x00)

    # helpers -------------------------------------------------------------------------------
    def _inquiry(self, cdb: bytes) -> ScsiResult:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 1:
            page = cdb[2]
            if page == 0x00:
                body = bytes([0x00, 0x80, 0x83])
            elif page == 0x80:
                body = b"FAKE0001"
            elif page == 0x83:
                desig = b"FAKEDISK" + b"0001"
                body = bytes([0x02, 0x01, 0x00, len(desig)]) + desig
            else:
                return _check(0x05, 0x24, 0x00)
            return ScsiResult(data_in=(bytes([0, page]) + struct.pack(">H", len(body)) + body)[:alloc])
        std = bytearray(36)
        std[2], std[3], std[4], std[7] = 0x06, 0x02, 31, 0x02
        std[8:16] = b"VTLTEST "
        std[16:32] = b"FAKE DISK       "
        std[32:36] = b"0001"
        return ScsiResult(data_in=bytes(std[:alloc]))

    @staticmethod
    def _decode_rw(cdb: bytes) -> tuple[bool, int, int] | None:
        op = cdb[0]
        if op in (0x28, 0x2A, 0x2E):
            return op != 0x28, struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        if op in (0xA8, 0xAA, 0xAE):
            return op != 0xA8, struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">I", cdb, 6)[0]
        if op in (0x88, 0x8A, 0x8E):
            return op != 0x88, struct.unpack_from(">Q", cdb, 2)[0], struct.unpack_from(">I", cdb, 10)[0]
        return None

    def _rw(self, cmd: ScsiCommand, write: bool, lba: int, count: int) -> ScsiResult:
        nbytes = count * BLOCK
        if lba + count > self.blocks:
            return _check(0x05, 0x21, 0x00, nbytes if write else None)
        start = lba * BLOCK
        if not write:
            return ScsiResult(data_in=memoryview(self.data)[start:start + nbytes])
        n = min(nbytes, len(cmd.data_out))
        self.data[start:start + n] = bytes(cmd.data_out[:n])
        return ScsiResult(data_out_expected=nbytes if nbytes != len(cmd.data_out) else None)
