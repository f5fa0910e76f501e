"""The tape drive: an SSC-3 sequential-access logical unit over a :class:`Cartridge`.

Identity: IBM ULT3580-TD5 (LTO-5, density 58h), peripheral device type 01h, removable.

Invariants:
- Positions are logical object identifiers (blocks and filemarks both count, SSC-3 3.1.37);
  READ POSITION, LOCATE and SPACE all speak them, so ``mt tell`` after ``mt fsf`` agrees.
- Nothing is buffered in the drive: every WRITE reaches the cartridge log before GOOD status;
  durability (fsync) happens at WRITE FILEMARKS without Immed, REWIND, LOAD UNLOAD and unload().
  READ POSITION therefore reports an empty object buffer.
- Sense for SSC conditions follows SSC-3 4.2 / 6 / 7: FILEMARK (NO SENSE 00/01, FILEMARK=1),
  END-OF-DATA (BLANK CHECK 00/05, VALID=1), early warning (NO SENSE 00/02, EOM=1), hard end
  (VOLUME OVERFLOW 00/02, EOM=1), beginning of partition (NO SENSE 00/04, EOM=1), incorrect
  length (ILI=1, INFORMATION = residue, two's complement when negative).
- No wall clock: the drive never reads the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vtl.library.cartridge import (
    Cartridge,
    MediumCorrupt,
    SpaceResult,
    Stop,
    TapeObject,
    VolumeOverflow,
    WormViolation,
)
from vtl.library.ssc import (
    LTO4_DENSITY,
    LTO5_DENSITY,
    HOST_ATTRIBUTES,
    MAX_HOST_ATTRIBUTE_LEN,
    VENDOR_HOST_ATTRIBUTES,
    Attribute,
    AttrFormat,
    AttrId,
    BlockLimits,
    CompressionPage,
    Density,
    DeviceConfigurationPage,
    InformationalExceptionsPage,
    LocateDest,
    MediumPartitionPage,
    PositionForm,
    ReadAttributeAction,
    SpaceCode,
    TapePosition,
    attribute_list,
    attribute_values,
    decode_attribute_list,
    density_support,
    signed24,
    signed64,
)
from vtl.library.tapelog import (
    LogPage,
    SequentialCounters,
    TapeAlert,
    supported_pages,
    tapealert_bits,
    tapealert_page,
)
from vtl.scsi.cdb import SscOpcode, u16, u24, u32, u64
from vtl.scsi.command import ScsiCommand, ScsiResult
from vtl.scsi.inquiry import VersionDescriptor
from vtl.scsi.lu import Request, command
from vtl.scsi.modepages import BlockDescriptor, ModePage
from vtl.scsi.sense import Asc, FieldPointer, SenseError, SenseKey, illegal_request
from vtl.scsi.spc import SpcDevice

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BLOCK = 1 * MiB
LIMIT_MAX_BLOCK = 4 * MiB
MAX_TRANSFER = 64 * MiB  # fixed-mode READ/WRITE: larger transfers are refused (24/00 byte 2)
VENDOR = "IBM"
PRODUCT = "ULT3580-TD5"
REVISION = "G9N1"
MEDIUM_TYPE_DATA = 0x00
MEDIUM_TYPE_WORM = 0x01
DSP_WP = 0x80
DSP_BUFFERED = 0x10
MAM_MEDIUM_TYPE_DATA = 0x00
MAM_MEDIUM_TYPE_WORM = 0x80


@dataclass(frozen=True, slots=True)
class DriveStats:
    """Counters for ``vtl library status`` (drive lifetime, since construction)."""

    bytes_written: int
    bytes_read: int


def _medium_not_present() -> SenseError:
    return SenseError(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)


def _residue(value: int) -> int:
    """INFORMATION is 32 bits; negative residues are two's complement (SSC-3 6.4)."""
    return value & 0xFFFFFFFF


class TapeDrive(SpcDevice):
    """An LTO-5 drive (SSC-3). The changer calls ``load``/``unload``; initiators send CDBs."""

    peripheral_type = 0x01
    removable = True
    supports_reserve6 = True

    def __init__(self, *, index: int, serial: str, device_name: str = "",
                 max_block_size: int = DEFAULT_MAX_BLOCK) -> None:
        if not 1 <= max_block_size <= LIMIT_MAX_BLOCK:
            raise ValueError(f"max_block_size must be 1..{LIMIT_MAX_BLOCK}")
        super().__init__(vendor=VENDOR, product=PRODUCT, revision=REVISION, serial=serial,
                         device_name=device_name)
        self.index = index
        self.max_block_size = max_block_size
        self._cart: Cartridge | None = None
        self._read_only = False
        self._unloaded = False
        self._becoming: str | None = None  # barcode of a medium whose data is being fetched
        self._prevent: set[str] = set()
        self._block_length = 0  # 0 = variable-block mode
        self._alerts: set[int] = set()
        self._bytes_written = 0
        self._bytes_read = 0
        self._load_written = 0
        self._load_read = 0
        self._compression = CompressionPage()
        self._pages = self._build_pages()

    # --- changer-facing API ------------------------------------------------------------------
    @property
    def barcode(self) -> str | None:
        return self._cart.barcode if self._cart is not None else None

    @property
    def cartridge(self) -> Cartridge | None:
        return self._cart

    @property
    def medium_present(self) -> bool:
        return self._cart is not None

    @property
    def removal_prevented(self) -> bool:
        return bool(self._prevent)

    @property
    def unloaded_by_initiator(self) -> bool:
        """LOAD UNLOAD with LOAD=0 was issued: the medium waits to be taken by the changer."""
        return self._cart is not None and self._unloaded

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def becoming_ready(self) -> str | None:
        """Barcode of the medium put in by :meth:`begin_load`, until :meth:`load` or unload."""
        return self._becoming if self._cart is None else None

    def begin_load(self, barcode: str) -> None:
        """A medium is in the drive but its data is still on its way (fetched back from the
        object store): commands that need the medium get NOT READY, 04/01 (becoming ready,
        SPC-4 4.5.6) until :meth:`load` gives the cartridge."""
        if self._cart is not None:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_DESTINATION_ELEMENT_FULL)
        self._becoming = barcode

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def stats(self) -> DriveStats:
        return DriveStats(self._bytes_written, self._bytes_read)

    def load(self, cartridge: Cartridge, *, read_only: bool = False) -> None:
        """Insert a cartridge: position at BOP, count the load, UA 28/00 to every nexus."""
        if self._cart is not None:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_DESTINATION_ELEMENT_FULL)
        self._cart = cartridge
        self._becoming = None
        self._read_only = read_only
        self._unloaded = False
        self._load_written = self._load_read = 0
        cartridge.rewind()
        cartridge.update_meta(load_count=cartridge.meta.load_count + 1)
        self._partition_page.current = self._partition_page.default = (
            MediumPartitionPage(cartridge.capacity_bytes).encode()[2:])
        self.unit_attention(Asc.NOT_READY_TO_READY_CHANGE)

    def unload(self, *, force: bool = False) -> Cartridge | None:
        """Take the cartridge out (flushed and fsynced); the caller owns (and closes) it.

        Raises ILLEGAL REQUEST 53/02 while an initiator prevents medium removal (unless force).
        """
        cart = self._cart
        if cart is None:
            self._becoming = None  # a medium still becoming ready leaves with nothing to close
            return None
        if self._prevent and not force:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
        self._finish_session(cart)
        cart.rewind()
        self._cart = None
        self._unloaded = False
        self._read_only = False
        if force:
            self._prevent.clear()
        return cart

    def close(self) -> None:
        if self._cart is not None:
            self._finish_session(self._cart)
            self._cart.close()
            self._cart = None

    def _finish_session(self, cart: Cartridge) -> None:
        cart.sync()
        meta = cart.meta
        cart.update_meta(lifetime_written=meta.lifetime_written + self._load_written,
                         lifetime_read=meta.lifetime_read + self._load_read)
        self._load_written = self._load_read = 0

    # --- the streaming path ------------------------------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        """A backup stream's variable-block READ(6) or WRITE(6) goes straight to the cartridge
        when nothing else is to be decided: no unit attention pending and no reservation of
        another nexus, no FIXED (nor, for WRITE, reserved) and no CONTROL bits, medium ready and
        writable, no compression, a written block that stays before the early warning, a read
        block of exactly the length asked. Everything else (and anything the cartridge declines) goes
        through the LogicalUnit dispatcher and the handlers below; both answer alike (tested
        command for command in tests/library/test_drive_stream.py)."""
        cdb = cmd.cdb
        op = cdb[0]
        # FIXED=0 (and for READ, SILI either way: it only matters for a block of another length)
        if (op == 0x0A and not cdb[1] or op == 0x08 and not cdb[1] & 0xFD) \
                and not cdb[5] & 0x05:
            cart = self._cart
            nexus = cmd.nexus
            q = self._ua.get(nexus)
            holder = self.reserved_by
            if cart is not None and not self._unloaded and q is not None and not q.pending \
                    and (holder is None or holder == nexus):
                length = (cdb[2] << 16) | (cdb[3] << 8) | cdb[4]
                if op == 0x0A:
                    data = cmd.data_out
                    if 0 < length <= self.max_block_size and len(data) == length \
                            and not self._read_only and not self._compression.dce:
                        try:
                            done = cart.append_plain_block(data)
                        except OSError as exc:
                            return self._check(nexus, self._medium_error(exc, write=True))
                        if done:
                            self._note_written(length)
                            return ScsiResult()
                elif length:
                    try:
                        block = cart.read_plain_block(length)
                    except OSError as exc:
                        return self._check(nexus, self._medium_error(exc, write=False))
                    if block is not None:
                        self._count_read(length)
                        return ScsiResult(data_in=block)
        return super().execute(cmd)

    # --- LogicalUnit / SpcDevice hooks ----------------------------------------------------------
    def ready(self) -> None:
        """NOT READY 3A/00 without a medium, or after LOAD UNLOAD unloaded it (SSC-3 7.3);
        NOT READY 04/01 while a medium's data is still being fetched (:meth:`begin_load`)."""
        if self._cart is None and self._becoming is not None:
            raise SenseError(SenseKey.NOT_READY, Asc.LUN_BECOMING_READY)
        if self._cart is None or self._unloaded:
            raise _medium_not_present()

    def reset(self) -> None:
        self._prevent.clear()
        super().reset()

    def forget_nexus(self, nexus: str) -> None:
        self._prevent.discard(nexus)
        super().forget_nexus(nexus)

    def _build_pages(self) -> list[ModePage]:
        comp = ModePage(0x0F, default=CompressionPage().encode()[2:],
                        changeable=CompressionPage.changeable()[2:], apply=self._apply_compression)
        devconf = ModePage(0x10, default=DeviceConfigurationPage().encode()[2:],
                           changeable=DeviceConfigurationPage.changeable()[2:],
                           validate=self._validate_devconf)
        self._partition_page = ModePage(0x11, default=MediumPartitionPage().encode()[2:],
                                        changeable=MediumPartitionPage.changeable()[2:])
        iec = ModePage(0x1C, default=InformationalExceptionsPage().encode()[2:],
                       changeable=InformationalExceptionsPage.changeable()[2:])
        return [comp, devconf, self._partition_page, iec]

    def _apply_compression(self, page: bytes) -> None:
        self._compression = CompressionPage.decode(page)

    @staticmethod
    def _validate_devconf(page: bytes) -> None:
        if len(page) > 14 and page[14] not in (0, 1):  # SELECT DATA COMPRESSION ALGORITHM
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_VALUE_INVALID,
                             field=FieldPointer(14, None, in_cdb=False))

    def mode_pages(self) -> list[ModePage]:
        return [*super().mode_pages(), *self._pages]

    def version_descriptors(self) -> list[int]:
        return [*super().version_descriptors(), VersionDescriptor.SSC_3]

    def apply_mode_header(self, medium_type: int, device_specific: int) -> None:
        """SSC-3 8.3.1: BUFFER MODE and SPEED are accepted; the drive is always write-through."""

    def block_descriptor(self) -> BlockDescriptor | None:
        """SSC-3 8.3.1: density of the loaded medium (0 without one), block length 0=variable."""
        density = Density.LTO5 if self._cart is not None else Density.DEFAULT
        return BlockDescriptor(density_code=density, number_of_blocks=0,
                               block_length=self._block_length)

    def apply_block_descriptor(self, desc: BlockDescriptor) -> None:
        if desc.density_code not in (Density.DEFAULT, Density.LTO5, Density.LTO4,
                                     Density.NO_CHANGE):
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                             field=FieldPointer(0, None, in_cdb=False))
        if desc.block_length > self.max_block_size:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                             field=FieldPointer(5, None, in_cdb=False))
        self._block_length = desc.block_length

    def medium_type(self) -> int:
        if self._cart is not None and self._cart.worm:
            return MEDIUM_TYPE_WORM
        return MEDIUM_TYPE_DATA

    def device_specific_parameter(self) -> int:
        """SSC-3 8.3.1: WP (0x80) when the loaded medium is write protected; BUFFER MODE 1."""
        wp = DSP_WP if self._cart is not None and self._read_only else 0
        return wp | DSP_BUFFERED

    @property
    def block_length(self) -> int:
        """Current fixed block length from the mode block descriptor (0 = variable mode)."""
        return self._block_length

    # --- helpers ----------------------------------------------------------------------------------
    def _medium(self) -> Cartridge:
        self.ready()
        assert self._cart is not None
        return self._cart

    def _writable(self) -> Cartridge:
        cart = self._medium()
        if self._read_only:
            self._alerts.add(TapeAlert.WRITE_PROTECT)
            raise SenseError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        try:
            cart.check_writable()
        except WormViolation:
            self._alerts.add(TapeAlert.WORM_OVERWRITE)
            raise SenseError(SenseKey.DATA_PROTECT, Asc.WORM_MEDIUM_OVERWRITE_ATTEMPTED) from None
        return cart

    def _fail(self, req: Request, err: SenseError, data: bytes) -> ScsiResult:
        """CHECK CONDITION that still carries data-in (READ with ILI/FILEMARK/EOD)."""
        result = self._check(req.nexus, err)
        result.data_in = data
        return result

    def _medium_error(self, exc: Exception, *, write: bool) -> SenseError:
        log.error("drive %d: medium error: %s", self.index, exc)
        self._alerts.add(TapeAlert.WRITE_FAILURE if write else TapeAlert.READ_FAILURE)
        self._alerts.add(TapeAlert.MEDIA)
        return SenseError(SenseKey.MEDIUM_ERROR,
                          Asc.WRITE_ERROR if write else Asc.UNRECOVERED_READ_ERROR)

    def _eod(self, residue: int | None) -> SenseError:
        """BLANK CHECK 00/05 (SSC-3 4.2.x); EOM only when EOD lies past early warning."""
        eom = self._cart is not None and self._cart.early_warning
        return SenseError(SenseKey.BLANK_CHECK, Asc.END_OF_DATA_DETECTED, eom=eom,
                          information=None if residue is None else _residue(residue))

    def _space_sense(self, res: SpaceResult) -> None:
        """Turn a short space into SSC-3 sense (SPACE 7.x, LOCATE past EOD)."""
        if res.stop is Stop.NONE:
            return
        info = _residue(res.residue)
        if res.stop is Stop.FILEMARK:
            raise SenseError(SenseKey.NO_SENSE, Asc.FILEMARK_DETECTED, filemark=True,
                             information=info)
        if res.stop is Stop.EOD:
            raise self._eod(info)
        raise SenseError(SenseKey.NO_SENSE, Asc.BEGINNING_OF_PARTITION_MEDIUM_DETECTED, eom=True,
                         information=info)

    # --- SSC commands -----------------------------------------------------------------------------
    @command(SscOpcode.REWIND)
    def rewind(self, req: Request) -> None:
        """REWIND (SSC-3 7.6): flush, position at BOP. Immed is accepted (we finish at once)."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFE)
        cart = self._medium()
        cart.sync()
        cart.rewind()

    @command(SscOpcode.READ_BLOCK_LIMITS)
    def read_block_limits(self, req: Request) -> bytes:
        """READ BLOCK LIMITS (SSC-3 7.5); MLOC (SSC-4) is not supported."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFF)
        return BlockLimits(self.max_block_size).encode()

    @command(SscOpcode.READ_6)
    def read6(self, req: Request) -> bytes | ScsiResult:
        """READ(6) (SSC-3 6.4): FIXED, SILI; ILI/FILEMARK/EOD sense with residues."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFC)
        fixed, sili = bool(req.cdb[1] & 0x01), bool(req.cdb[1] & 0x02)
        if fixed and sili:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=1)
        if fixed and self._block_length == 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        length = u24(req.cdb, 2)
        cart = self._medium()
        if length == 0:
            return b""
        if fixed:
            if length * self._block_length > MAX_TRANSFER:
                raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
            return self._read_fixed(req, cart, length)
        return self._read_variable(req, cart, length, sili)

    def _read_object(self, cart: Cartridge) -> TapeObject | None:
        try:
            return cart.read_next()
        except (MediumCorrupt, OSError) as exc:
            raise self._medium_error(exc, write=False) from None

    def _read_variable(self, req: Request, cart: Cartridge, length: int,
                       sili: bool) -> bytes | ScsiResult:
        obj = self._read_object(cart)
        if obj is None:
            raise self._eod(length)
        if obj.is_filemark:
            raise SenseError(SenseKey.NO_SENSE, Asc.FILEMARK_DETECTED, filemark=True,
                             information=length)
        data = obj.data[:length]
        self._count_read(len(data))
        actual = len(obj.data)
        if actual == length:
            return data
        if sili and (actual < length or self._block_length == 0):
            return data
        err = SenseError(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL, ili=True,
                         information=_residue(length - actual))
        return self._fail(req, err, data)

    def _read_fixed(self, req: Request, cart: Cartridge, count: int) -> bytes | ScsiResult:
        size = self._block_length
        out = bytearray()
        for done in range(count):
            obj = self._read_object(cart)
            err: SenseError | None = None
            if obj is None:
                err = self._eod(count - done)
            elif obj.is_filemark:
                err = SenseError(SenseKey.NO_SENSE, Asc.FILEMARK_DETECTED, filemark=True,
                                 information=count - done)
            elif len(obj.data) != size:
                err = SenseError(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL, ili=True,
                                 information=count - done)
            if err is not None:
                self._count_read(len(out))
                return self._fail(req, err, bytes(out))
            assert obj is not None
            out += obj.data
        self._count_read(len(out))
        return bytes(out)

    def _count_read(self, n: int) -> None:
        self._bytes_read += n
        self._load_read += n

    @command(SscOpcode.WRITE_6)
    def write6(self, req: Request) -> ScsiResult | None:
        """WRITE(6) (SSC-3 6.7): early warning -> NO SENSE 00/02 EOM (data written); no room ->
        VOLUME OVERFLOW 00/02 EOM with the residue; block > maximum -> 24/00."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFE)
        fixed = bool(req.cdb[1] & 0x01)
        length = u24(req.cdb, 2)
        if fixed and self._block_length == 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        if not fixed and length > self.max_block_size:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
        cart = self._writable() if length else self._medium()
        if length == 0:
            return None
        size = self._block_length if fixed else length
        count = length if fixed else 1
        if size * count > MAX_TRANSFER:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
        total = size * count
        data = memoryview(req.data_out)
        if len(data) < total:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB,
                             field=FieldPointer(2))
        dce = self._compression.dce  # SSC-3 8.3.2: the initiator turns compression on
        for done in range(count):
            block = data[done * size:(done + 1) * size]
            try:
                cart.write_block(block, compress=dce)
            except VolumeOverflow:
                self._note_written(done * size)
                raise SenseError(SenseKey.VOLUME_OVERFLOW, Asc.END_OF_PARTITION_MEDIUM_DETECTED,
                                 eom=True, information=(count - done) if fixed else length) from None
            except WormViolation:
                raise SenseError(SenseKey.DATA_PROTECT,
                                 Asc.WORM_MEDIUM_OVERWRITE_ATTEMPTED) from None
            except OSError as exc:
                raise self._medium_error(exc, write=True) from None
        self._note_written(total)
        self._early_warning(cart)
        if len(data) != total:
            return ScsiResult(data_out_expected=total)
        return None

    def _note_written(self, n: int) -> None:
        self._bytes_written += n
        self._load_written += n

    @staticmethod
    def _early_warning(cart: Cartridge) -> None:
        if cart.early_warning:
            raise SenseError(SenseKey.NO_SENSE, Asc.END_OF_PARTITION_MEDIUM_DETECTED, eom=True,
                             information=0)

    @command(SscOpcode.WRITE_FILEMARKS_6)
    def write_filemarks6(self, req: Request) -> None:
        """WRITE FILEMARKS(6) (SSC-3 6.8): Immed=0 is a durability point; WSMK unsupported."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFC)
        if req.cdb[1] & 0x02:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=1)
        self._write_filemarks(u24(req.cdb, 2), immed=bool(req.cdb[1] & 0x01))

    @command(SscOpcode.WRITE_FILEMARKS_16)
    def write_filemarks16(self, req: Request) -> None:
        """WRITE FILEMARKS(16) (SSC-4 6.x): partition 0, LOGICAL OBJECT IDENTIFIER = position."""
        req.need_cdb(16)
        req.check_reserved(1, 0xFC)
        if req.cdb[1] & 0x02:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=1)
        if req.cdb[3] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=3)
        cart = self._medium()
        if u64(req.cdb, 4) != cart.position:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=4)
        self._write_filemarks(u24(req.cdb, 12), immed=bool(req.cdb[1] & 0x01))

    def _write_filemarks(self, count: int, *, immed: bool) -> None:
        cart = self._writable() if count else self._medium()
        for done in range(count):
            try:
                cart.write_filemarks(1)
            except VolumeOverflow:
                raise SenseError(SenseKey.VOLUME_OVERFLOW, Asc.END_OF_PARTITION_MEDIUM_DETECTED,
                                 eom=True, information=count - done) from None
            except OSError as exc:
                raise self._medium_error(exc, write=True) from None
        if not immed:
            try:
                cart.sync()
            except OSError as exc:
                raise self._medium_error(exc, write=True) from None
        if count:
            self._early_warning(cart)

    @command(SscOpcode.SPACE_6)
    def space6(self, req: Request) -> None:
        """SPACE(6) (SSC-3 7.9): blocks, filemarks, end of data; 24-bit signed count."""
        req.need_cdb(6)
        req.check_reserved(1, 0xF0)
        self._space(req.cdb[1] & 0x0F, signed24(u24(req.cdb, 2)))

    @command(SscOpcode.SPACE_16)
    def space16(self, req: Request) -> None:
        """SPACE(16) (SSC-3 7.10): 64-bit signed count; PARAMETER LENGTH must be zero."""
        req.need_cdb(16)
        req.check_reserved(1, 0xF0)
        if u16(req.cdb, 12):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=12)
        self._space(req.cdb[1] & 0x0F, signed64(u64(req.cdb, 4)))

    def _space(self, code: int, count: int) -> None:
        cart = self._medium()
        if code == SpaceCode.BLOCKS:
            self._space_sense(cart.space_blocks(count))
        elif code == SpaceCode.FILEMARKS:
            self._space_sense(cart.space_filemarks(count))
        elif code == SpaceCode.END_OF_DATA:
            cart.space_eod()
        else:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=3)

    @command(SscOpcode.LOCATE_10)
    def locate10(self, req: Request) -> None:
        """LOCATE(10) (SSC-3 7.4): BT (same numbering), CP with partition 0 only."""
        req.need_cdb(10)
        req.check_reserved(1, 0xF8)
        cp = bool(req.cdb[1] & 0x02)
        if cp and req.cdb[8] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=8)
        self._locate(u32(req.cdb, 3))

    @command(SscOpcode.LOCATE_16)
    def locate16(self, req: Request) -> None:
        """LOCATE(16) (SSC-4 7.6): DEST_TYPE object / file / end of data; partition 0 only."""
        req.need_cdb(16)
        req.check_reserved(1, 0xC4)
        req.check_reserved(2, 0xFE)
        cp = bool(req.cdb[1] & 0x02)
        if cp and req.cdb[3] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=3)
        dest = (req.cdb[1] >> 3) & 0x07
        target = u64(req.cdb, 4)
        cart = self._medium()
        if dest == LocateDest.OBJECT:
            self._locate(target)
        elif dest == LocateDest.FILE:
            cart.rewind()
            if target:
                res = cart.space_filemarks(target)
                if res.stop is not Stop.NONE:
                    raise self._eod(None)
        elif dest == LocateDest.END_OF_DATA:
            cart.space_eod()
        else:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=5)

    def _locate(self, target: int) -> None:
        cart = self._medium()
        if not cart.locate(target):
            raise self._eod(None)

    @command(SscOpcode.READ_POSITION)
    def read_position(self, req: Request) -> bytes:
        """READ POSITION (SSC-3 7.7): short (00h/01h), long (06h), extended (08h) forms."""
        req.need_cdb(10)
        req.check_reserved(1, 0xE0)
        form = req.cdb[1] & 0x1F
        cart = self._medium()
        pos = cart.position
        here = TapePosition(bop=pos == 0, eop=False, bpew=cart.early_warning, first=pos,
                            last=pos, file=cart.filemarks_before(pos))
        if form in (PositionForm.SHORT, PositionForm.SHORT_VENDOR):
            return here.encode_short()
        if form == PositionForm.LONG:
            return here.encode_long()
        if form == PositionForm.EXTENDED:
            return req.reply(here.encode_extended(), u16(req.cdb, 7))
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=4)

    @command(SscOpcode.ERASE_6)
    def erase6(self, req: Request) -> None:
        """ERASE(6) (SSC-3 6.3): LONG or short, both make the position the end of data."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFC)
        cart = self._writable()
        try:
            cart.erase()
            cart.sync()
        except OSError as exc:
            raise self._medium_error(exc, write=True) from None

    @command(SscOpcode.LOAD_UNLOAD)
    def load_unload(self, req: Request) -> None:
        """LOAD UNLOAD (SSC-3 7.3): LOAD=1 (re)loads at BOP; LOAD=0 rewinds, flushes and leaves
        the medium for the changer (TEST UNIT READY then says 3A/00). EOT+LOAD is invalid."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFE)
        req.check_reserved(4, 0xF0)
        load, eot = bool(req.cdb[4] & 0x01), bool(req.cdb[4] & 0x04)
        if load and eot:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=4, bit=2)
        cart = self._cart
        if cart is None:
            self.ready()  # 04/01 while becoming ready, else 3A/00
            raise _medium_not_present()
        if load:
            self._unloaded = False
            cart.rewind()
            return
        if self._unloaded:
            raise _medium_not_present()
        if self._prevent:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
        self._finish_session(cart)
        cart.rewind()
        self._unloaded = True

    @command(SscOpcode.PREVENT_ALLOW_MEDIUM_REMOVAL)
    def prevent_allow(self, req: Request) -> None:
        """PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.13 / SSC-3): per I_T nexus."""
        req.need_cdb(6)
        req.check_reserved(4, 0xFE)
        if req.cdb[4] & 0x01:
            self._prevent.add(req.nexus)
        else:
            self._prevent.discard(req.nexus)

    @command(SscOpcode.REPORT_DENSITY_SUPPORT)
    def report_density_support(self, req: Request) -> bytes:
        """REPORT DENSITY SUPPORT (SSC-3 7.8): MEDIA=1 -> the loaded medium's density only."""
        req.need_cdb(10)
        req.check_reserved(1, 0xFC)
        if req.cdb[1] & 0x02:  # MEDIUM TYPE descriptors are not supported
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=1)
        if req.cdb[1] & 0x01:
            self._medium()
            data = density_support([LTO5_DENSITY])
        else:
            data = density_support([LTO5_DENSITY, LTO4_DENSITY])
        return req.reply(data, u16(req.cdb, 7))

    @command(0x4D)
    def log_sense(self, req: Request) -> bytes:
        """LOG SENSE (SPC-4 6.6): pages 00h, 0Ch, 2Eh; reading 2Eh clears the flags."""
        req.need_cdb(10)
        req.check_reserved(1, 0xFC)
        if req.cdb[1] & 0x01:  # SP: saving is not supported
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        page, subpage = req.cdb[2] & 0x3F, req.cdb[3]
        first = u16(req.cdb, 5)
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=3)
        if page == LogPage.SUPPORTED:
            data = supported_pages()
        elif page == LogPage.SEQUENTIAL_ACCESS:
            data = SequentialCounters(self._bytes_written, self._bytes_read).encode(first)
        elif page == LogPage.TAPE_ALERT:
            data = tapealert_page(frozenset(self._alerts), first)
            self._alerts.clear()
        else:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2, bit=5)
        return req.reply(data, u16(req.cdb, 7))

    @command(0x4C)
    def log_select(self, req: Request) -> None:
        """LOG SELECT (SPC-4 6.5): PCR resets the counters and flags; no parameter lists."""
        req.need_cdb(10)
        req.check_reserved(1, 0xFC)
        if u16(req.cdb, 7):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=7)
        if req.cdb[1] & 0x02:
            self._bytes_written = self._bytes_read = 0
            self._alerts.clear()

    @command(0x8C)
    def read_attribute(self, req: Request) -> bytes:
        """READ ATTRIBUTE (SPC-4 6.16): ATTRIBUTE VALUES and ATTRIBUTE LIST, volume/partition 0."""
        req.need_cdb(16)
        req.check_reserved(1, 0xE0)
        action = req.cdb[1] & 0x1F
        if req.cdb[5] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=5)
        if req.cdb[7] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=7)
        cart = self._medium()
        attrs = self._attributes(cart)
        if action == ReadAttributeAction.ATTRIBUTE_VALUES:
            data = attribute_values(attrs, u16(req.cdb, 8))
        elif action in (ReadAttributeAction.ATTRIBUTE_LIST,
                        ReadAttributeAction.SUPPORTED_ATTRIBUTES):
            data = attribute_list(attrs)
        else:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=4)
        return req.reply(data, u32(req.cdb, 10))

    @command(0x8D)
    def write_attribute(self, req: Request) -> None:
        """WRITE ATTRIBUTE (SPC-4 6.40): host type (0800h-0BFFh) and vendor host attributes
        (1400h-17FFh) are stored with the cartridge; a zero length deletes one. Any other
        identifier is read-only: 26/00 with a field pointer, nothing is changed."""
        req.need_cdb(16)
        req.check_reserved(1, 0xFE)
        if req.cdb[5] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=5)
        if req.cdb[7] != 0:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=7)
        length = u32(req.cdb, 10)
        cart = self._medium()
        if length == 0:
            return
        data = bytes(req.data_out[:length])
        if len(data) < length:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
        try:
            attrs = decode_attribute_list(data)
        except ValueError as exc:
            raise illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR, byte=int(exc.args[0]),
                                  in_cdb=False) from None
        stored = dict(cart.meta.attributes.get("host", {}))
        offset = 4
        for attr in attrs:
            writable = attr.ident in HOST_ATTRIBUTES or attr.ident in VENDOR_HOST_ATTRIBUTES
            if not writable or len(attr.value) > MAX_HOST_ATTRIBUTE_LEN:
                raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=offset,
                                      in_cdb=False)
            key = f"{attr.ident:04x}"
            if attr.value:
                stored[key] = {"format": int(attr.fmt), "value": attr.value.hex()}
            else:
                stored.pop(key, None)
            offset += 5 + len(attr.value)
        cart.update_meta(attributes={**cart.meta.attributes, "host": stored})

    def vpd_pages(self) -> dict[int, bytes]:
        """VPD B0h sequential-access device capabilities (SSC-3 8.4.2): WORM supported."""
        return {0xB0: bytes([0x01, 0x00])}

    def _host_attributes(self, cart: Cartridge) -> list[Attribute]:
        out = []
        for key, entry in cart.meta.attributes.get("host", {}).items():
            try:
                out.append(Attribute(int(key, 16), AttrFormat(entry["format"]),
                                     bytes.fromhex(entry["value"]), read_only=False))
            except (KeyError, TypeError, ValueError):
                log.warning("drive %d: ignoring bad stored attribute %r", self.index, key)
        return out

    def _attributes(self, cart: Cartridge) -> list[Attribute]:
        """MAM attributes (SPC-4 7.4.2) of the loaded cartridge; capacities in MiB. Host
        attributes written by applications come from the cartridge metadata (a written
        BARCODE replaces the default one)."""
        host = self._host_attributes(cart)
        written = {a.ident for a in host}
        meta = cart.meta
        written_mb = (meta.lifetime_written + self._load_written) // MiB
        read_mb = (meta.lifetime_read + self._load_read) // MiB
        worm = MAM_MEDIUM_TYPE_WORM if cart.worm else MAM_MEDIUM_TYPE_DATA
        return [
            Attribute.binary(AttrId.REMAINING_CAPACITY, cart.remaining_bytes // MiB, 8),
            Attribute.binary(AttrId.MAXIMUM_CAPACITY, cart.capacity_bytes // MiB, 8),
            Attribute.binary(AttrId.TAPEALERT_FLAGS, tapealert_bits(frozenset(self._alerts)), 8),
            Attribute.binary(AttrId.LOAD_COUNT, meta.load_count, 8),
            Attribute.binary(AttrId.FORMATTED_DENSITY_CODE, Density.LTO5, 1),
            Attribute.binary(AttrId.TOTAL_MB_WRITTEN_LIFE, written_mb, 8),
            Attribute.binary(AttrId.TOTAL_MB_READ_LIFE, read_mb, 8),
            Attribute.binary(AttrId.TOTAL_MB_WRITTEN_LOAD, self._load_written // MiB, 8),
            Attribute.binary(AttrId.TOTAL_MB_READ_LOAD, self._load_read // MiB, 8),
            Attribute.ascii(AttrId.MEDIUM_MANUFACTURER, "VTL", 8),
            Attribute.ascii(AttrId.MEDIUM_SERIAL_NUMBER, cart.barcode, 32),
            Attribute.ascii(AttrId.ASSIGNING_ORGANIZATION_2, "LTO-CVE", 8),
            Attribute.binary(AttrId.MEDIUM_DENSITY_CODE, Density.LTO5, 1),
            Attribute.ascii(AttrId.MEDIUM_MANUFACTURE_DATE, meta.manufactured, 8),
            Attribute.binary(AttrId.MEDIUM_TYPE, worm, 1),
            *([] if AttrId.BARCODE in written
              else [Attribute.ascii(AttrId.BARCODE, cart.barcode, 32, read_only=False)]),
            *host,
        ]
