"""BlockDevice: a pure SBC-3 direct-access logical unit over a byte-addressed backend.

The device turns CDBs into ``read``/``write``/``discard``/``flush`` calls on a
:class:`BlockBackend` and never touches a file, a socket or a clock itself (the stored and
cached backends live beside it). SPC-4 commands (INQUIRY, MODE SENSE/SELECT, TEST UNIT READY,
REQUEST SENSE, ...) come from :class:`vtl.scsi.spc.SpcDevice`; this module adds SBC-3 clause 5.

Invariants:
- Every command that addresses the medium checks its LBA range (LBA OUT OF RANGE, 21/00)
  and never touches the backend for a failed check; UNMAP validates the whole parameter list
  before it deallocates anything.
- Unmapped (deallocated) blocks read back as zeros, which is what LBPRZ=1 promises.
- The write cache is write-back while WCE=1 (the default): GOOD for a WRITE means "in the
  backend's cache". FUA, WRITE AND VERIFY, SYNCHRONIZE CACHE and WCE=0 call ``flush()``.
- A read-only device (``read_only=True``, e.g. a restored snapshot) answers every command that
  would change the medium with DATA PROTECT / WRITE PROTECTED (27/00) and sets WP in the mode
  parameter header.
- Data-out: the transport hands over at most its Expected Data Transfer Length. After every
  command :meth:`BlockDevice.execute` reports in ``ScsiResult.data_out_expected`` how many bytes
  the CDB called for, so the transport can set the residual (also on CHECK CONDITION). When
  a WRITE or WRITE AND VERIFY gets fewer bytes than its TRANSFER LENGTH, the whole blocks that
  did arrive are written and the command ends GOOD: the command is processed as usual except
  that nothing past the transport's byte count is transferred, and the transport reports the
  overflow residual (the first of the outcomes FCP-4 allows when the data length is short). A
  trailing partial block is never written: then, and for every other command whose data-out is
  short, nothing is written and the command ends with ILLEGAL REQUEST / INVALID FIELD IN
  COMMAND INFORMATION UNIT (0E/03), FCP-4's second outcome. libiscsi's iSCSIResiduals tests
  (1.19 and later) accept exactly these two.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from vtl.scsi.cdb import CONTROL_USAGE, SbcOpcode, SbcServiceAction
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.lu import Request, command
from vtl.scsi.inquiry import VersionDescriptor, VpdPage
from vtl.scsi.modepages import BlockDescriptor, DescriptorFormat, ModePage, control_mode_page
from vtl.scsi.sense import Asc, SenseError, SenseKey, illegal_request
from vtl.scsi.spc import SpcDevice

# SPC-4 annex D: not (yet) in vtl.scsi.sense.Asc.
INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)

_MIB = 1024 * 1024
_ZERO_CHUNK = 1 * _MIB  # WRITE SAME writes in pieces of at most this many bytes


class ProvisioningStatus(enum.IntEnum):
    """GET LBA STATUS descriptor provisioning status (SBC-3, GET LBA STATUS parameter data)."""

    MAPPED = 0x0
    DEALLOCATED = 0x1
    ANCHORED = 0x2


class ProvisioningType(enum.IntEnum):
    """Logical Block Provisioning VPD PROVISIONING TYPE (SBC-3, Logical Block Provisioning VPD page)."""

    NOT_REPORTED = 0x0
    RESOURCE_PROVISIONED = 0x1
    THIN_PROVISIONED = 0x2


class ModePageCode(enum.IntEnum):
    """Mode pages of a direct-access block device (SBC-3, "Mode parameters")."""

    READ_WRITE_ERROR_RECOVERY = 0x01
    CACHING = 0x08
    CONTROL = 0x0A


class BlockBackend(Protocol):
    """Byte-addressed storage behind a :class:`BlockDevice`.

    ``read`` returns exactly ``length`` bytes (zeros where nothing was written or after a
    discard); ``discard`` may keep the space allocated but must make the range read as zeros;
    ``flush`` makes every completed write durable; ``extents`` reports which parts of a range
    hold data (True) or are deallocated (False), in order, covering the range exactly.
    I/O errors surface as ``OSError``.
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def extents(self, offset: int, length: int) -> Iterable[tuple[int, int, bool]]: ...


# --- VPD pages ------------------------------------------------------------------------------
_BLOCK_LIMITS = struct.Struct(">BBHIIIIIIIQ20x")
assert _BLOCK_LIMITS.size == 60  # page length 0x3C (SBC-3, Block Limits VPD page)


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block Limits VPD page 0xB0 (SBC-3, Block Limits VPD page); lengths in logical blocks, 0 = no limit."""

    max_transfer_length: int
    optimal_transfer_length: int
    optimal_transfer_granularity: int = 1
    max_compare_and_write_length: int = 1
    max_unmap_lba_count: int = 0
    max_unmap_descriptors: int = 0
    optimal_unmap_granularity: int = 1
    max_write_same_length: int = 0
    write_same_non_zero: bool = True  # WSNZ: NUMBER OF LOGICAL BLOCKS 0 is refused

    def encode(self) -> bytes:
        """The page payload (bytes 4..63)."""
        return _BLOCK_LIMITS.pack(
            1 if self.write_same_non_zero else 0, self.max_compare_and_write_length,
            self.optimal_transfer_granularity, self.max_transfer_length,
            self.optimal_transfer_length, 0, self.max_unmap_lba_count,
            self.max_unmap_descriptors, self.optimal_unmap_granularity,
            0,  # UGAVALID=0: no unmap granularity alignment reported
            self.max_write_same_length)


def block_device_characteristics_page() -> bytes:
    """Block Device Characteristics VPD 0xB1 payload (SBC-3, Block Device Characteristics VPD page): non-rotating medium."""
    return struct.pack(">H58x", 0x0001)


def logical_block_provisioning_page(*, unmap: bool = True) -> bytes:
    """Logical Block Provisioning VPD 0xB2 payload (SBC-3, Logical Block Provisioning VPD page), thin provisioned.

    LBPU (UNMAP), LBPWS (WRITE SAME(16) UNMAP), LBPWS10 (WRITE SAME(10) UNMAP) and LBPRZ
    (unmapped blocks read as zeros); no threshold, no anchors, no provisioning group descriptor.
    """
    flags = 0x04  # LBPRZ
    if unmap:
        flags |= 0x80 | 0x40 | 0x20
    return bytes([0, flags, ProvisioningType.THIN_PROVISIONED, 0])


# --- mode pages ------------------------------------------------------------------------------
WCE = 0x04  # caching mode page byte 2 (SBC-3, Caching mode page)


def read_write_error_recovery_page() -> ModePage:
    """Read-Write Error Recovery mode page 01h (SBC-3, Read-Write Error Recovery mode page), page length 0Ah.

    No retries to tune and no reallocation: all zeros, nothing changeable.
    """
    return ModePage(ModePageCode.READ_WRITE_ERROR_RECOVERY, default=bytes(10))


def caching_page(*, on_change: Callable[[bytes], None] | None = None) -> ModePage:
    """Caching mode page 08h (SBC-3, Caching mode page), page length 12h: WCE=1 by default and changeable
    (MODE SELECT WCE=0 turns every write into write-through); read cache always on (RCD=0)."""
    default = bytearray(18)
    default[0] = WCE  # byte 2
    mask = bytearray(18)
    mask[0] = WCE
    return ModePage(ModePageCode.CACHING, default=bytes(default), changeable=bytes(mask),
                    apply=on_change)


# --- CDB decoding ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Layout:
    """Where LBA and length sit in one CDB format (the CDB tables of each SBC-3 command)."""

    size: int
    lba_at: int
    lba_len: int
    blocks_at: int
    blocks_len: int


_L10 = _Layout(10, 2, 4, 7, 2)
_L12 = _Layout(12, 2, 4, 6, 4)
_L16 = _Layout(16, 2, 8, 10, 4)

_LAYOUTS: dict[int, _Layout] = {
    SbcOpcode.READ_10: _L10, SbcOpcode.WRITE_10: _L10, SbcOpcode.VERIFY_10: _L10,
    SbcOpcode.WRITE_AND_VERIFY_10: _L10, SbcOpcode.PRE_FETCH_10: _L10,
    SbcOpcode.SYNCHRONIZE_CACHE_10: _L10, SbcOpcode.WRITE_SAME_10: _L10,
    SbcOpcode.READ_12: _L12, SbcOpcode.WRITE_12: _L12, SbcOpcode.VERIFY_12: _L12,
    SbcOpcode.WRITE_AND_VERIFY_12: _L12,
    SbcOpcode.READ_16: _L16, SbcOpcode.WRITE_16: _L16, SbcOpcode.VERIFY_16: _L16,
    SbcOpcode.WRITE_AND_VERIFY_16: _L16, SbcOpcode.PRE_FETCH_16: _L16,
    SbcOpcode.SYNCHRONIZE_CACHE_16: _L16, SbcOpcode.WRITE_SAME_16: _L16,
}

_WRITES = frozenset({SbcOpcode.WRITE_6, SbcOpcode.WRITE_10, SbcOpcode.WRITE_12,
                     SbcOpcode.WRITE_16, SbcOpcode.WRITE_AND_VERIFY_10,
                     SbcOpcode.WRITE_AND_VERIFY_12, SbcOpcode.WRITE_AND_VERIFY_16})
_VERIFIES = frozenset({SbcOpcode.VERIFY_10, SbcOpcode.VERIFY_12, SbcOpcode.VERIFY_16})


def _field(cdb: bytes, at: int, length: int) -> int:
    return int.from_bytes(cdb[at:at + length], "big")


def decode_lba_blocks(cdb: bytes) -> tuple[int, int]:
    """(LBA, NUMBER OF LOGICAL BLOCKS) of a 6/10/12/16-byte block command.

    READ (6) / WRITE (6) (SBC-3, READ (6) and WRITE (6) commands): 21-bit LBA, TRANSFER LENGTH 0 means 256 blocks.
    """
    op = cdb[0]
    if op in (SbcOpcode.READ_6, SbcOpcode.WRITE_6):
        if len(cdb) < 6:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)
        return _field(cdb, 1, 3) & 0x1FFFFF, cdb[4] or 256
    layout = _LAYOUTS[op]
    if len(cdb) < layout.size:
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)
    return (_field(cdb, layout.lba_at, layout.lba_len),
            _field(cdb, layout.blocks_at, layout.blocks_len))


def expected_data_out(cdb: bytes, block_size: int) -> int | None:
    """How many data-out bytes this CDB calls for, or None for commands without data-out.

    Pure arithmetic on the CDB; never raises (it also runs for CDBs a handler refused).
    """
    if len(cdb) < 6:
        return None
    op = cdb[0]
    try:
        if op in _WRITES:
            return decode_lba_blocks(cdb)[1] * block_size
        if op in _VERIFIES:
            bytchk = (cdb[1] >> 1) & 0x3
            blocks = decode_lba_blocks(cdb)[1]
            if bytchk == 1:
                return blocks * block_size
            if bytchk == 3:
                return block_size if blocks else 0
            return 0
        if op == SbcOpcode.WRITE_SAME_10 and len(cdb) >= 10:
            return block_size
        if op == SbcOpcode.WRITE_SAME_16 and len(cdb) >= 16:
            return 0 if cdb[1] & 0x01 else block_size
        if op == SbcOpcode.UNMAP and len(cdb) >= 10:
            return _field(cdb, 7, 2)
        if op == SbcOpcode.COMPARE_AND_WRITE and len(cdb) >= 16:
            return 2 * cdb[13] * block_size
    except SenseError:
        return None
    return None


def _usage(*fields: int) -> bytes:
    return bytes([*fields, CONTROL_USAGE])


_FF4 = (0xFF,) * 4
_FF8 = (0xFF,) * 8
# CDB USAGE DATA for REPORT SUPPORTED OPERATION CODES (SPC-4 6.35.3): a bit is 1 where this
# device evaluates it. Byte 1 of READ/WRITE: xxPROTECT, DPO, FUA; GROUP NUMBER is ignored.
SBC_CDB_USAGE: dict[tuple[int, int | None], bytes] = {
    (SbcOpcode.READ_6, None): _usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF),
    (SbcOpcode.WRITE_6, None): _usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF),
    (SbcOpcode.START_STOP_UNIT, None): _usage(0x1B, 0x01, 0x00, 0x00, 0x05),
    (SbcOpcode.READ_CAPACITY_10, None): _usage(0x25, 0x00, *_FF4, 0x00, 0x00, 0x01),
    (SbcOpcode.READ_10, None): _usage(0x28, 0xF8, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.WRITE_10, None): _usage(0x2A, 0xF8, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.WRITE_AND_VERIFY_10, None): _usage(0x2E, 0xF2, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.VERIFY_10, None): _usage(0x2F, 0xF6, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.PRE_FETCH_10, None): _usage(0x34, 0x02, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.SYNCHRONIZE_CACHE_10, None): _usage(0x35, 0x02, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.WRITE_SAME_10, None): _usage(0x41, 0xFF, *_FF4, 0x00, 0xFF, 0xFF),
    (SbcOpcode.UNMAP, None): _usage(0x42, 0x01, 0, 0, 0, 0, 0x00, 0xFF, 0xFF),
    (SbcOpcode.READ_16, None): _usage(0x88, 0xF8, *_FF8, *_FF4, 0x00),
    (SbcOpcode.COMPARE_AND_WRITE, None): _usage(0x89, 0xF8, *_FF8, 0, 0, 0, 0xFF, 0x00),
    (SbcOpcode.WRITE_16, None): _usage(0x8A, 0xF8, *_FF8, *_FF4, 0x00),
    (SbcOpcode.WRITE_AND_VERIFY_16, None): _usage(0x8E, 0xF2, *_FF8, *_FF4, 0x00),
    (SbcOpcode.VERIFY_16, None): _usage(0x8F, 0xF6, *_FF8, *_FF4, 0x00),
    (SbcOpcode.PRE_FETCH_16, None): _usage(0x90, 0x02, *_FF8, *_FF4, 0x00),
    (SbcOpcode.SYNCHRONIZE_CACHE_16, None): _usage(0x91, 0x02, *_FF8, *_FF4, 0x00),
    (SbcOpcode.WRITE_SAME_16, None): _usage(0x93, 0xFF, *_FF8, *_FF4, 0x00),
    (SbcOpcode.SERVICE_ACTION_IN_16, SbcServiceAction.READ_CAPACITY_16):
        _usage(0x9E, 0x10, *(0,) * 8, *_FF4, 0x00),
    (SbcOpcode.SERVICE_ACTION_IN_16, SbcServiceAction.GET_LBA_STATUS):
        _usage(0x9E, 0x12, *_FF8, *_FF4, 0x00),
    (SbcOpcode.READ_12, None): _usage(0xA8, 0xF8, *_FF4, *_FF4, 0x00),
    (SbcOpcode.WRITE_12, None): _usage(0xAA, 0xF8, *_FF4, *_FF4, 0x00),
    (SbcOpcode.WRITE_AND_VERIFY_12, None): _usage(0xAE, 0xF2, *_FF4, *_FF4, 0x00),
    (SbcOpcode.VERIFY_12, None): _usage(0xAF, 0xF6, *_FF4, *_FF4, 0x00),
}


# --- the device ------------------------------------------------------------------------------
class BlockDevice(SpcDevice):
    """An SBC-3 direct-access block device (peripheral device type 0) over a BlockBackend.

    ``block_size`` is 512 or 4096; the backend size is rounded down to whole blocks.
    ``physical_block_size`` (default: the logical block size) is reported in READ CAPACITY(16)
    (LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT); ``granularity_bytes`` (default 4096, the page
    and file-system block size under a stored volume) becomes the OPTIMAL TRANSFER LENGTH
    GRANULARITY and OPTIMAL UNMAP GRANULARITY of the Block Limits page, which is where
    initiators look for alignment. ``read_only`` makes the medium write protected.
    Deallocation is cheap (a hole punch), so MAXIMUM UNMAP LBA COUNT defaults to FFFFFFFFh
    (no limit). MAXIMUM WRITE SAME LENGTH is FFFFh blocks: one WRITE SAME never writes more
    than 32 MiB (256 MiB with 4096-byte blocks) of non-zero data.
    """

    peripheral_type = 0x00
    removable = False
    descriptor_format = DescriptorFormat.SHORT_LBA
    supports_reserve6 = True  # SPC-2 RESERVE/RELEASE: clusters without persistent reservations

    def __init__(self, backend: BlockBackend, *, vendor: str = "VTL", product: str = "VOLUME",
                 revision: str = "0100", serial: str, device_name: str = "",
                 block_size: int = 512, physical_block_size: int | None = None,
                 granularity_bytes: int = 4096,
                 read_only: bool = False, max_transfer_bytes: int = 8 * _MIB,
                 max_unmap_descriptors: int = 256,
                 max_unmap_lba_count: int = 0xFFFFFFFF) -> None:
        if block_size not in (512, 4096):
            raise ValueError("block_size must be 512 or 4096")
        if physical_block_size is None:
            physical_block_size = block_size
        if physical_block_size % block_size or physical_block_size < block_size:
            raise ValueError("physical_block_size must be a multiple of block_size")
        super().__init__(vendor=vendor, product=product, revision=revision, serial=serial,
                         device_name=device_name)
        self.backend = backend
        self.block_size = block_size
        self.physical_block_size = physical_block_size
        self.read_only = read_only
        self.write_cache_enabled = True
        self.closed = False
        self._sbc_pages = [read_write_error_recovery_page(),
                           caching_page(on_change=self._apply_caching)]
        if read_only:  # SPC-4 7.5.8: SWP=1, the medium is write protected
            self._sbc_pages.append(control_mode_page(swp=True))
        per_granule = max(1, max(granularity_bytes, physical_block_size) // block_size)
        max_transfer = max_transfer_bytes // block_size
        self.limits = BlockLimits(
            max_transfer_length=max_transfer,
            optimal_transfer_length=min(max_transfer, _MIB // block_size),
            optimal_transfer_granularity=per_granule,
            max_compare_and_write_length=1,
            max_unmap_lba_count=max_unmap_lba_count,
            max_unmap_descriptors=max_unmap_descriptors,
            optimal_unmap_granularity=per_granule,
            max_write_same_length=0xFFFF,
        )

    # --- geometry ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.backend.size // self.block_size

    def _check_range(self, lba: int, blocks: int, *, strict: bool = True) -> None:
        """LBA OUT OF RANGE (SBC-3, "Logical blocks") when any addressed block lies past the last LBA.

        ``strict``: an LBA past the last one is refused even for a zero-length transfer.
        """
        n = self.num_blocks
        if lba + blocks > n or (strict and lba >= n):
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)

    def _check_transfer(self, opcode: int, blocks: int) -> None:
        """SBC-3 READ/WRITE/VERIFY commands: TRANSFER LENGTH beyond MAXIMUM TRANSFER LENGTH is INVALID FIELD IN CDB."""
        if self.limits.max_transfer_length and blocks > self.limits.max_transfer_length:
            layout = _LAYOUTS.get(opcode)
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB,
                                  byte=layout.blocks_at if layout else 4)

    def _check_writable(self) -> None:
        if self.read_only:
            raise SenseError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)

    def _check_protect(self, req: Request) -> None:
        """RDPROTECT/WRPROTECT/VRPROTECT other than 0 need protection information (SBC-3, "Protection information model"),
        which this device does not support (PROTECT=0): INVALID FIELD IN CDB."""
        if req.cdb[1] & 0xE0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=7)

    def _data(self, req: Request, length: int) -> memoryview:
        """The first ``length`` bytes of data-out; 0E/03 when fewer arrived (see module doc)."""
        data = memoryview(req.data_out).cast("B")
        if len(data) < length:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)
        return data[:length]

    def _whole_blocks(self, req: Request, blocks: int) -> memoryview:
        """Data-out for a WRITE: all ``blocks``, or the whole blocks that arrived when the
        transport's EDTL was smaller (see the module docstring); a partial block is 0E/03."""
        want = blocks * self.block_size
        have = len(req.data_out)
        if have < want and have % self.block_size:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)
        return self._data(req, min(want, have))

    # --- backend calls with error mapping ----------------------------------------------------
    def _read(self, lba: int, blocks: int) -> bytes:
        try:
            return self.backend.read(lba * self.block_size, blocks * self.block_size)
        except OSError:
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR,
                             information=lba & 0xFFFFFFFF) from None

    def _write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool) -> None:
        try:
            self.backend.write(lba * self.block_size, data)
            if fua or not self.write_cache_enabled:
                self.backend.flush()
        except OSError as exc:
            raise self._write_error(exc, lba) from None

    def _discard(self, lba: int, blocks: int) -> None:
        try:
            self.backend.discard(lba * self.block_size, blocks * self.block_size)
        except OSError as exc:
            raise self._write_error(exc, lba) from None

    def _flush(self) -> None:
        try:
            self.backend.flush()
        except OSError as exc:
            raise self._write_error(exc, None) from None

    @staticmethod
    def _write_error(exc: OSError, lba: int | None) -> SenseError:
        """ENOSPC on a thin volume is SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3, "Logical block provisioning", thin provisioning)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SenseError(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        info = lba & 0xFFFFFFFF if lba is not None else None
        return SenseError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=info)

    # --- SpcDevice hooks ----------------------------------------------------------------------
    def ready(self) -> None:
        """NOT READY once the volume has been closed (deleted while a session was logged in)."""
        if self.closed:
            raise SenseError(SenseKey.NOT_READY, Asc.LUN_NOT_READY_CAUSE_NOT_REPORTABLE)

    def close(self) -> None:
        self.closed = True

    def vpd_pages(self) -> dict[int, bytes]:
        return {
            VpdPage.BLOCK_LIMITS: self.limits.encode(),
            VpdPage.BLOCK_DEVICE_CHARACTERISTICS: block_device_characteristics_page(),
            VpdPage.LOGICAL_BLOCK_PROVISIONING: logical_block_provisioning_page(),
        }

    def version_descriptors(self) -> list[int]:
        return [*super().version_descriptors(), VersionDescriptor.SBC_3]

    def service_actions(self) -> dict[int, tuple[int, ...]]:
        return {**super().service_actions(),
                SbcOpcode.SERVICE_ACTION_IN_16: (SbcServiceAction.READ_CAPACITY_16,
                                                 SbcServiceAction.GET_LBA_STATUS)}

    def cdb_usage(self, opcode: int, service_action: int | None) -> bytes | None:
        usage = SBC_CDB_USAGE.get((opcode, service_action))
        return usage if usage is not None else super().cdb_usage(opcode, service_action)

    def device_specific_parameter(self) -> int:
        """SBC-3 mode parameter header DEVICE-SPECIFIC PARAMETER: WP (0x80) for a read-only medium, DPOFUA (0x10): DPO and FUA honoured."""
        return (0x80 if self.read_only else 0) | 0x10

    def medium_type(self) -> int:
        return 0x00

    def mode_pages(self) -> list[ModePage]:
        """SPC's Control pages plus Read-Write Error Recovery (01h) and Caching (08h); a
        read-only device replaces the Control page by one with SWP set."""
        base = super().mode_pages()
        if self.read_only:
            base = [p for p in base if p.key != (0x0A, 0)]
        return [*base, *self._sbc_pages]

    def _apply_caching(self, page: bytes) -> None:
        """MODE SELECT of the caching page: take WCE (byte 2 bit 2)."""
        self.write_cache_enabled = bool(page[2] & WCE)

    def block_descriptor(self) -> BlockDescriptor | None:
        """The short LBA mode parameter block descriptor (SBC-3): blocks and block length."""
        return BlockDescriptor(number_of_blocks=self.num_blocks, block_length=self.block_size)

    def apply_block_descriptor(self, desc: BlockDescriptor) -> None:
        """MODE SELECT may restate the block length but not change it (no FORMAT UNIT); the
        NUMBER OF LOGICAL BLOCKS may be 0 or the current count (SBC-3, mode parameter block descriptors). Field pointers
        are relative to the descriptor (short LBA layout)."""
        if desc.block_length not in (0, self.block_size):
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=5,
                                  in_cdb=False)
        if desc.number_of_blocks not in (0, self.num_blocks, 0xFFFFFFFF):
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=0, in_cdb=False)

    # --- dispatcher wrapper -------------------------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        """Run the command, then report the data-out length the CDB called for (residuals)."""
        result = super().execute(cmd)
        if result.data_out_expected is None:
            want = expected_data_out(bytes(cmd.cdb), self.block_size)
            if want is not None and want != len(cmd.data_out):
                result.data_out_expected = want
        return result

    # --- READ / WRITE (SBC-3 READ (6/10/12/16), WRITE (6/10/12/16)) -------------------------------------------
    @command(SbcOpcode.READ_6, SbcOpcode.READ_10, SbcOpcode.READ_12, SbcOpcode.READ_16)
    def _read_cmd(self, req: Request) -> bytes:
        """READ(6/10/12/16). DPO and FUA accepted: the backend cache is coherent (SBC-3 READ (10): FUA)."""
        lba, blocks = decode_lba_blocks(req.cdb)
        if req.opcode != SbcOpcode.READ_6:
            self._check_protect(req)
        self.ready()
        self._check_range(lba, blocks)
        self._check_transfer(req.opcode, blocks)
        if blocks == 0:
            return b""
        return self._read(lba, blocks)

    @command(SbcOpcode.WRITE_6, SbcOpcode.WRITE_10, SbcOpcode.WRITE_12, SbcOpcode.WRITE_16)
    def _write_cmd(self, req: Request) -> None:
        """WRITE(6/10/12/16); FUA (byte 1 bit 3) makes the data durable before GOOD."""
        lba, blocks = decode_lba_blocks(req.cdb)
        fua = False
        if req.opcode != SbcOpcode.WRITE_6:
            self._check_protect(req)
            fua = bool(req.cdb[1] & 0x08)
        self.ready()
        self._check_range(lba, blocks)
        self._check_transfer(req.opcode, blocks)
        self._check_writable()
        if blocks == 0:
            return None
        data = self._whole_blocks(req, blocks)
        if data:
            self._write(lba, data, fua=fua)
        return None

    @command(SbcOpcode.WRITE_AND_VERIFY_10, SbcOpcode.WRITE_AND_VERIFY_12,
             SbcOpcode.WRITE_AND_VERIFY_16)
    def _write_verify(self, req: Request) -> None:
        """WRITE AND VERIFY(10/12/16) (SBC-3 WRITE AND VERIFY (10/12/16)): write, make durable, read back."""
        lba, blocks = decode_lba_blocks(req.cdb)
        self._check_protect(req)
        self.ready()
        self._check_range(lba, blocks)
        self._check_transfer(req.opcode, blocks)
        self._check_writable()
        if blocks == 0:
            return None
        data = self._whole_blocks(req, blocks)
        if not data:
            return None
        self._write(lba, data, fua=True)
        if self._read(lba, len(data) // self.block_size) != data:
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=lba & 0xFFFFFFFF)
        return None

    # --- VERIFY (SBC-3 VERIFY (10/12/16)) ------------------------------------------------------------
    @command(SbcOpcode.VERIFY_10, SbcOpcode.VERIFY_12, SbcOpcode.VERIFY_16)
    def _verify(self, req: Request) -> None:
        """VERIFY(10/12/16). BYTCHK 00: medium check only; 01: compare with data-out; 11: compare
        every block with the single data-out block; 10 is reserved. A difference ends with
        MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION (1D/00), INFORMATION = byte offset of the
        first differing byte in the data-out buffer."""
        lba, blocks = decode_lba_blocks(req.cdb)
        self._check_protect(req)
        bytchk = (req.cdb[1] >> 1) & 0x3
        if bytchk == 2:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=2)
        self.ready()
        self._check_range(lba, blocks)
        self._check_transfer(req.opcode, blocks)
        if blocks == 0:
            return None
        if bytchk == 0:
            self._read(lba, blocks)
            return None
        bs = self.block_size
        data = self._data(req, blocks * bs if bytchk == 1 else bs)
        medium = self._read(lba, blocks)
        if bytchk == 3:
            data = memoryview(bytes(data) * blocks)
        _compare(medium, data)
        return None

    # --- COMPARE AND WRITE (SBC-3) -------------------------------------------------------
    @command(SbcOpcode.COMPARE_AND_WRITE)
    def _compare_and_write(self, req: Request) -> None:
        """Compare NUMBER OF LOGICAL BLOCKS with the first half of data-out and, when equal,
        write the second half. The LU executes one command at a time, which makes it atomic."""
        req.need_cdb(16)
        self._check_protect(req)
        lba, blocks = _field(req.cdb, 2, 8), req.cdb[13]
        if blocks > self.limits.max_compare_and_write_length:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=13)
        if blocks == 0 and len(req.data_out):
            # NUMBER OF LOGICAL BLOCKS 0 transfers nothing (SBC-3 COMPARE AND WRITE); data-out beside it means
            # the initiator meant something else (e.g. 256 blocks wrapped to 0): refuse it.
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=13)
        self.ready()
        self._check_range(lba, blocks)
        self._check_writable()
        if blocks == 0:
            return None
        n = blocks * self.block_size
        if len(req.data_out) != 2 * n:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)
        data = self._data(req, 2 * n)
        _compare(self._read(lba, blocks), data[:n])
        self._write(lba, data[n:], fua=bool(req.cdb[1] & 0x08))
        return None

    # --- READ CAPACITY (SBC-3 READ CAPACITY (10), READ CAPACITY (16)) ----------------------------------------------------
    @command(SbcOpcode.READ_CAPACITY_10)
    def _read_capacity_10(self, req: Request) -> bytes:
        """RETURNED LOGICAL BLOCK ADDRESS is FFFFFFFFh when the last LBA does not fit, telling
        the initiator to use READ CAPACITY(16). PMI=0 with a non-zero LBA is invalid."""
        req.need_cdb(10)
        pmi = req.cdb[8] & 0x01
        if not pmi and _field(req.cdb, 2, 4):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
        self.ready()
        last = self.num_blocks - 1
        return struct.pack(">II", min(max(last, 0), 0xFFFFFFFF), self.block_size)

    @command(SbcOpcode.SERVICE_ACTION_IN_16)
    def _service_action_in(self, req: Request) -> bytes:
        req.need_cdb(16)
        action = req.cdb[1] & 0x1F
        if action == SbcServiceAction.READ_CAPACITY_16:
            return self._read_capacity_16(req)
        if action == SbcServiceAction.GET_LBA_STATUS:
            return self._get_lba_status(req)
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=4)

    def _read_capacity_16(self, req: Request) -> bytes | memoryview:
        """READ CAPACITY(16) parameter data, 32 bytes (SBC-3 READ CAPACITY (16) parameter data): no protection, LBPME
        (thin provisioning management enabled) and LBPRZ (unmapped blocks read zeros)."""
        self.ready()
        alloc = _field(req.cdb, 10, 4)
        exponent = (self.physical_block_size // self.block_size).bit_length() - 1
        data = struct.pack(">QIBBH16x", max(self.num_blocks - 1, 0), self.block_size, 0,
                           exponent & 0x0F, 0x8000 | 0x4000)
        return req.reply(data, alloc)

    def _get_lba_status(self, req: Request) -> bytes | memoryview:
        """GET LBA STATUS (SBC-3 GET LBA STATUS command): descriptors of mapped / deallocated extents from the
        STARTING LBA on, as many as the allocation length holds."""
        self.ready()
        start, alloc = _field(req.cdb, 2, 8), _field(req.cdb, 10, 4)
        n = self.num_blocks
        if start >= n:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
        room = max(1, (alloc - 8) // 16)
        bs = self.block_size
        end = start + min(n - start, 1 << 24)  # look at most 2^24 blocks ahead
        try:
            extents = list(self.backend.extents(start * bs, (end - start) * bs))
        except OSError:
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR) from None
        mapped: list[tuple[int, int]] = []  # [lo, hi) block ranges; a partly mapped block is mapped
        for offset, length, is_mapped in extents:
            if not is_mapped or length <= 0:
                continue
            lo, hi = offset // bs, -(-(offset + length) // bs)
            if mapped and lo <= mapped[-1][1]:
                mapped[-1] = (mapped[-1][0], max(hi, mapped[-1][1]))
            else:
                mapped.append((lo, hi))
        runs: list[tuple[int, int, ProvisioningStatus]] = []
        pos = start
        for lo, hi in mapped:
            lo, hi = max(lo, pos), min(hi, end)
            if hi <= lo:
                continue
            if lo > pos:
                runs.append((pos, lo - pos, ProvisioningStatus.DEALLOCATED))
            runs.append((lo, hi - lo, ProvisioningStatus.MAPPED))
            pos = hi
        if pos < end:
            runs.append((pos, end - pos, ProvisioningStatus.DEALLOCATED))
        descs = [struct.pack(">QIB3x", lba, blocks, status) for lba, blocks, status in runs[:room]]
        body = b"".join(descs)
        data = struct.pack(">I4x", len(body) + 4) + body
        return req.reply(data, alloc)

    # --- SYNCHRONIZE CACHE, PRE-FETCH, START STOP UNIT ----------------------------------------
    @command(SbcOpcode.SYNCHRONIZE_CACHE_10, SbcOpcode.SYNCHRONIZE_CACHE_16)
    def _synchronize_cache(self, req: Request) -> None:
        """SYNCHRONIZE CACHE(10/16) (SBC-3 SYNCHRONIZE CACHE commands): range checked, then the whole backend
        is flushed (a superset of the range). IMMED is accepted; we always complete first."""
        lba, blocks = decode_lba_blocks(req.cdb)
        self.ready()
        self._check_range(lba, blocks)
        self._flush()
        return None

    @command(SbcOpcode.PRE_FETCH_10, SbcOpcode.PRE_FETCH_16)
    def _pre_fetch(self, req: Request) -> None:
        """PRE-FETCH(10/16) (SBC-3 PRE-FETCH commands): nothing to stage; GOOD ("cache too small")."""
        lba, blocks = decode_lba_blocks(req.cdb)
        self.ready()
        self._check_range(lba, blocks)
        return None

    @command(SbcOpcode.START_STOP_UNIT)
    def _start_stop_unit(self, req: Request) -> None:
        """START STOP UNIT (SBC-3 START STOP UNIT command): accepted; a stop flushes the cache unless NO_FLUSH.
        The medium is not removable, so LOEJ has no effect."""
        req.need_cdb(6)
        start, no_flush = req.cdb[4] & 0x01, req.cdb[4] & 0x04
        if not start and not no_flush and not self.closed:
            self._flush()
        return None

    # --- WRITE SAME, UNMAP (SBC-3 WRITE SAME (10/16), UNMAP) --------------------------------------------
    @command(SbcOpcode.WRITE_SAME_10, SbcOpcode.WRITE_SAME_16)
    def _write_same(self, req: Request) -> None:
        """WRITE SAME(10/16). UNMAP=1 deallocates the range (LBPRZ: it then reads zeros) when the
        data-out block is all zeros (or NDOB=1 on WRITE SAME(16)); otherwise the block is
        written to every LBA. A zero block without UNMAP is also deallocated: the result reads
        the same. ANCHOR is not supported (ANC_SUP=0); NUMBER OF LOGICAL BLOCKS 0 is refused
        (WSNZ=1) and above MAXIMUM WRITE SAME LENGTH is INVALID FIELD IN CDB."""
        lba, blocks = decode_lba_blocks(req.cdb)
        is16 = req.opcode == SbcOpcode.WRITE_SAME_16
        flags = req.cdb[1]
        self._check_protect(req)
        if flags & 0x10:  # ANCHOR
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=4)
        if flags & 0x06:  # PBDATA / LBDATA: no protection information, obsolete on SBC-3
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=2 if flags & 4 else 1)
        ndob = is16 and bool(flags & 0x01)
        if not is16 and flags & 0x01:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        if blocks == 0 or (self.limits.max_write_same_length
                           and blocks > self.limits.max_write_same_length):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=13 if is16 else 7)
        self.ready()
        self._check_range(lba, blocks)
        self._check_writable()
        bs = self.block_size
        if ndob:
            block = bytes(bs)
        else:
            if len(req.data_out) != bs:  # exactly one logical block (SBC-3 WRITE SAME)
                raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)
            block = bytes(self._data(req, bs))
        if not any(block):
            self._discard(lba, blocks)
            if not self.write_cache_enabled:
                self._flush()
            return None
        # UNMAP with a non-zero block: SBC-3 WRITE SAME lets the device write the data instead.
        per_chunk = max(1, _ZERO_CHUNK // bs)
        pattern = block * min(per_chunk, blocks)
        done = 0
        while done < blocks:
            n = min(per_chunk, blocks - done)
            self._write(lba + done, memoryview(pattern)[:n * bs], fua=False)
            done += n
        if not self.write_cache_enabled:
            self._flush()
        return None

    @command(SbcOpcode.UNMAP)
    def _unmap(self, req: Request) -> None:
        """UNMAP (SBC-3 UNMAP command). The parameter list is an 8-byte header (UNMAP DATA LENGTH,
        UNMAP BLOCK DESCRIPTOR DATA LENGTH) and 16-byte descriptors (LBA, NUMBER OF LOGICAL
        BLOCKS). PARAMETER LIST LENGTH 0 is a no-op; 1-7 is PARAMETER LIST LENGTH ERROR; an
        incomplete trailing descriptor is ignored; more descriptors than MAXIMUM UNMAP BLOCK
        DESCRIPTOR COUNT or more blocks than MAXIMUM UNMAP LBA COUNT is INVALID FIELD IN
        PARAMETER LIST; any descriptor past the last LBA is LBA OUT OF RANGE. All descriptors
        are checked before anything is deallocated."""
        req.need_cdb(10)
        if req.cdb[1] & 0x01:  # ANCHOR, ANC_SUP=0
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        plen = _field(req.cdb, 7, 2)
        self.ready()
        self._check_writable()
        if plen == 0:
            return None
        if plen < 8:
            raise illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR, byte=7)
        data = bytes(self._data(req, plen))
        ranges = parse_unmap_parameters(data)
        if len(ranges) > self.limits.max_unmap_descriptors:
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=2, in_cdb=False)
        total = 0
        for i, (lba, blocks) in enumerate(ranges):
            if blocks > self.limits.max_unmap_lba_count:
                raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=16 + 16 * i,
                                      in_cdb=False)
            self._check_range(lba, blocks, strict=False)
            total += blocks
        if total > self.limits.max_unmap_lba_count:
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=8, in_cdb=False)
        for lba, blocks in ranges:
            if blocks:
                self._discard(lba, blocks)
        if not self.write_cache_enabled:
            self._flush()
        return None


def parse_unmap_parameters(data: bytes) -> list[tuple[int, int]]:
    """(LBA, blocks) pairs of an UNMAP parameter list (SBC-3 UNMAP parameter list).

    The descriptor data length is bounded by the bytes present; a trailing partial descriptor
    is ignored. A header whose UNMAP DATA LENGTH or descriptor length runs past the list is
    refused with INVALID FIELD IN PARAMETER LIST only when it claims more than was sent.
    """
    if len(data) < 8:
        raise illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR, byte=7)
    data_len, desc_len = struct.unpack_from(">HH", data, 0)
    if desc_len > len(data) - 8:
        raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=2, in_cdb=False)
    if data_len and data_len + 2 < 8 + desc_len:
        raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=0, in_cdb=False)
    out = []
    for at in range(8, 8 + (desc_len // 16) * 16, 16):
        lba, blocks = struct.unpack_from(">QI", data, at)
        out.append((lba, blocks))
    return out


def _compare(medium: bytes, data: bytes | bytearray | memoryview) -> None:
    """MISCOMPARE 1D/00 with INFORMATION = offset of the first differing byte (SBC-3 VERIFY and COMPARE AND WRITE)."""
    expected = bytes(data)
    if medium == expected:
        return
    step = 4096  # find the differing chunk with C-speed compares, then the byte in it
    start = next(at for at in range(0, len(medium), step)
                 if medium[at:at + step] != expected[at:at + step])
    offset = start + next(i for i, (a, b) in enumerate(zip(medium[start:start + step],
                                                             expected[start:start + step]))
                          if a != b)
    raise SenseError(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=offset)
