"""SpcDevice: the SPC-4 commands every device shares, on top of the LogicalUnit dispatcher.

CONTRACT (fixed; refined here where the first draft left a choice open):

Devices (SBC disk, SSC tape drive, SMC changer) subclass ``SpcDevice`` and get INQUIRY (standard
data + VPD 0x00, 0x80, 0x83 and whatever ``vpd_pages`` adds), TEST UNIT READY (calls
``self.ready()``), REQUEST SENSE, MODE SENSE(6/10) / MODE SELECT(6/10) (driven by
``mode_pages()`` and the block descriptor hooks), REPORT SUPPORTED OPERATION CODES, and
RESERVE(6)/RELEASE(6) (and the 10-byte forms) when ``supports_reserve6`` is set. REPORT LUNS is
answered here too for a stand-alone LU; behind a ``vtl.scsi.target.ScsiTarget`` the target
answers it.

Hooks a subclass may override:
- ``vpd_pages() -> dict[int, bytes]``: extra VPD pages, page code -> page *payload* (the bytes
  after the 4-byte page header). 0x00, 0x80 and 0x83 are built by the base (an entry for 0x80 or
  0x83 replaces the base page); a subclass may add to 0x83 designators via
  ``extra_designators()``.
- ``extra_designators() -> list[bytes]``: additional complete designation descriptors for 0x83.
- ``inquiry_flags() -> InquiryFlags``: byte 5-7 flags of standard INQUIRY (e.g. CmdQue, MChngr).
- ``version_descriptors() -> list[int]``: SPC-4 version descriptors (e.g. 0x0460 SPC-4); the
  base returns SAM-5, SPC-4, iSCSI, extend with ``[*super().version_descriptors(), 0x0300]``.
- ``inquiry_vendor_specific() -> bytes``: standard INQUIRY bytes 36-55 (at most 20 bytes).
- ``mode_pages() -> list[ModePage]``: the device's mode pages (see vtl.scsi.modepages). The base
  returns the Control (0Ah) and Control Extension (0Ah/01h) pages it owns; extend with
  ``[*super().mode_pages(), *mine]``. Return the same ModePage objects each time (they hold the
  current values) or rebuild them from device state and take changes through ``apply``.
- ``block_descriptor() -> BlockDescriptor | None``: the current mode parameter block descriptor
  (density code, number of blocks, block length), or None when the device has none. Its layout
  follows the class attribute ``descriptor_format`` (GENERAL for tape/changer, SHORT_LBA for
  disk; disk also gets the 16-byte LONG_LBA form with MODE SENSE(10) LLBAA).
- ``apply_block_descriptor(desc: BlockDescriptor) -> None``: MODE SELECT sent a block
  descriptor; validate (raise SenseError with a parameter-list field pointer *relative to the
  descriptor's first byte*; the base moves it onto the parameter list) and apply.
- ``medium_type() -> int`` and ``device_specific_parameter() -> int``: bytes of the mode
  parameter header (e.g. tape WP bit 0x80, buffered mode 0x10; disk WP 0x80, DPOFUA 0x10).
- ``apply_mode_header(medium_type: int, device_specific: int) -> None``: MODE SELECT's header
  values (SSC-3: BUFFERED MODE and SPEED are set this way). Default: ignored.
- ``service_actions() -> dict[int, tuple[int, ...]]``: opcodes with service actions and the
  ones supported (for REPORT SUPPORTED OPERATION CODES); extend with ``{**super()...}``.
- ``cdb_usage(opcode, service_action) -> bytes | None``: CDB USAGE DATA for one command.
- ``ready()``: raise SenseError(NOT_READY, ...) when there is no medium etc.
- ``reset()``: LOGICAL UNIT RESET; call ``super().reset()`` (it drops the RESERVE(6)
  reservation and raises UA 29/03).

Call order in MODE SELECT: the whole parameter list is parsed and every page checked against
its changeable mask and validator first; then ``apply_block_descriptor``, ``apply_mode_header``
and the pages' ``apply`` run, in that order. Hooks should validate before they change state.

Choices (SPC-4 leaves them to the device server):
- REQUEST SENSE with DESC=1 returns descriptor-format sense (SPC-4 6.39, 4.5.2): the fixed
  sense is converted (information, command-specific, sense-key-specific and stream descriptors).
  Without a pending unit attention, REQUEST SENSE reports the LU's not-ready state as raised by
  ``ready()``, else NO SENSE (SPC-4 6.39: sense data describing the current state).
- MODE SENSE PC=11b (saved) returns current values for ``saveable`` pages, 39/00 otherwise;
  MODE SELECT SP=1 is INVALID FIELD IN CDB (byte 1 bit 0) unless every page sent is saveable.
- Changing a non-changeable bit in MODE SELECT is 26/00 INVALID FIELD IN PARAMETER LIST (SPC-4
  6.9); validators use 26/02 PARAMETER VALUE INVALID for changeable fields with bad values.
- A successful MODE SELECT that changes a value raises MODE PARAMETERS CHANGED (2A/01) on every
  other I_T nexus (SPC-4 7.5.1; all pages here are shared by all nexuses).
- RESERVE/RELEASE follow SPC-2 7.21/7.23: a reservation held by another nexus answers
  RESERVATION CONFLICT for every command except those in ``reservation_exempt``; it is released
  by RELEASE from the holder, LOGICAL UNIT RESET and the holder's nexus loss. A pending unit
  attention is reported before a reservation conflict.
"""

from __future__ import annotations

import struct
from typing import Callable, ClassVar

from vtl.scsi.cdb import (
    SPC_CDB_USAGE,
    SERVICE_ACTION_IN_BYTE1,
    MaintenanceInAction,
    SpcOpcode,
    generic_cdb_usage,
    u16,
    u32,
)
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.inquiry import (
    InquiryFlags,
    PeripheralQualifier,
    StandardInquiry,
    VersionDescriptor,
    VpdPage,
    ascii_field,
    device_identification_payload,
    supported_pages_payload,
    unit_serial_payload,
    vpd_page,
)
from vtl.scsi.lu import LogicalUnit, Request, command
from vtl.scsi.modepages import (
    SAVING_PARAMETERS_NOT_SUPPORTED,
    BlockDescriptor,
    DescriptorFormat,
    ModePage,
    ModeParameterHeader,
    PageControl,
    apply_updates,
    build_mode_data,
    control_extension_mode_page,
    control_mode_page,
    parse_mode_select,
    rebase_field,
    select_pages,
)
from vtl.scsi.sense import (
    Asc,
    FieldPointer,
    SenseError,
    SenseKey,
    descriptor_sense,
    illegal_request,
)
from vtl.scsi.target import MAX_LUN, report_luns_data

__all__ = ["SpcDevice", "descriptor_sense"]

MaintenanceInHandler = Callable[[Request], "bytes | memoryview"]

_COMMAND_DESCRIPTOR = struct.Struct(">BxHxBH")  # SPC-4 6.35.2 table 319
assert _COMMAND_DESCRIPTOR.size == 8
_ONE_COMMAND_HEAD = struct.Struct(">xBH")  # SPC-4 6.35.3 table 320
assert _ONE_COMMAND_HEAD.size == 4
_TIMEOUTS = struct.Struct(">HxBII")  # SPC-4 6.35.4 table 322
assert _TIMEOUTS.size == 12

# RSOC SUPPORT field values, SPC-4 6.35.3 table 321.
_SUPPORT_NOT_SUPPORTED = 0b001
_SUPPORT_STANDARD = 0b011

_RESERVE_OPCODES = frozenset({SpcOpcode.RESERVE_6, SpcOpcode.RELEASE_6,
                              SpcOpcode.RESERVE_10, SpcOpcode.RELEASE_10})


class SpcDevice(LogicalUnit):
    """Base of every device: the SPC-4 commands, driven by the hooks in the module docstring."""

    supports_reserve6: ClassVar[bool] = False
    descriptor_format: ClassVar[DescriptorFormat] = DescriptorFormat.GENERAL
    # Commands another nexus may still send while this LU is reserved (SPC-2 5.5.1).
    reservation_exempt: ClassVar[frozenset[int]] = frozenset({
        SpcOpcode.INQUIRY, SpcOpcode.REQUEST_SENSE, SpcOpcode.REPORT_LUNS,
        SpcOpcode.RELEASE_6, SpcOpcode.RELEASE_10,
    })

    def __init__(self, *, vendor: str, product: str, revision: str, serial: str,
                 device_name: str = "") -> None:
        super().__init__(vendor=vendor, product=product, revision=revision, serial=serial,
                         device_name=device_name)
        # Identity problems are configuration errors: fail at construction, not per command.
        ascii_field(vendor, 8, "vendor")
        ascii_field(product, 16, "product")
        ascii_field(revision, 4, "revision")
        unit_serial_payload(serial)
        self.reserved_by: str | None = None
        self.portal_group_tag = 1
        self.relative_port = 1
        self.port_group = 1
        self._spc_pages: list[ModePage] = [control_mode_page(), control_extension_mode_page()]

    # --- hooks (see the module docstring) ---------------------------------------------------
    def vpd_pages(self) -> dict[int, bytes]:
        return {}

    def extra_designators(self) -> list[bytes]:
        return []

    def inquiry_flags(self) -> InquiryFlags:
        return InquiryFlags(cmdque=True)

    def version_descriptors(self) -> list[int]:
        return [VersionDescriptor.SAM_5, VersionDescriptor.SPC_4, VersionDescriptor.ISCSI]

    def inquiry_vendor_specific(self) -> bytes:
        return b""

    def mode_pages(self) -> list[ModePage]:
        return list(self._spc_pages)

    def block_descriptor(self) -> BlockDescriptor | None:
        return None

    def apply_block_descriptor(self, desc: BlockDescriptor) -> None:
        """Default: accept only the current values; a difference points at the first field."""
        current = self.block_descriptor()
        if current is None or desc == current:
            return
        fmt = self.descriptor_format
        if fmt is DescriptorFormat.GENERAL and desc.density_code != current.density_code:
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=0, in_cdb=False)
        if desc.number_of_blocks != current.number_of_blocks:
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                                  byte=1 if fmt is DescriptorFormat.GENERAL else 0, in_cdb=False)
        raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                              byte=12 if fmt is DescriptorFormat.LONG_LBA else 5, in_cdb=False)

    def medium_type(self) -> int:
        return 0

    def device_specific_parameter(self) -> int:
        return 0

    def apply_mode_header(self, medium_type: int, device_specific: int) -> None:
        """MODE SELECT header values; default ignores them (SPC-4 7.5.4: device-type specific)."""

    def maintenance_in_actions(self) -> dict[int, MaintenanceInHandler]:
        rsoc = MaintenanceInAction.REPORT_SUPPORTED_OPERATION_CODES
        return {rsoc: self._report_supported_opcodes}

    def service_actions(self) -> dict[int, tuple[int, ...]]:
        return {SpcOpcode.MAINTENANCE_IN: tuple(sorted(self.maintenance_in_actions()))}

    def cdb_usage(self, opcode: int, service_action: int | None) -> bytes | None:
        usage = SPC_CDB_USAGE.get((opcode, service_action))
        return usage if usage is not None else generic_cdb_usage(opcode, service_action)

    def reset(self) -> None:
        self.reserved_by = None
        super().reset()

    def forget_nexus(self, nexus: str) -> None:
        if self.reserved_by == nexus:
            self.reserved_by = None
        super().forget_nexus(nexus)

    # --- derived data ----------------------------------------------------------------------
    @property
    def peripheral_byte(self) -> int:
        return (PeripheralQualifier.CONNECTED << 5) | self.peripheral_type

    def standard_inquiry(self) -> StandardInquiry:
        return StandardInquiry(
            peripheral_type=self.peripheral_type, vendor=self.vendor, product=self.product,
            revision=self.revision, removable=self.removable, flags=self.inquiry_flags(),
            vendor_specific=self.inquiry_vendor_specific(),
            version_descriptors=tuple(self.version_descriptors()),
        )

    def vpd_payloads(self) -> dict[int, bytes]:
        """Every VPD page payload, 0x00 included (its list is computed from the others)."""
        pages: dict[int, bytes] = {
            VpdPage.UNIT_SERIAL_NUMBER: unit_serial_payload(self.serial),
            VpdPage.DEVICE_IDENTIFICATION: device_identification_payload(
                vendor=self.vendor, serial=self.serial, device_name=self.device_name,
                portal_group_tag=self.portal_group_tag, relative_port=self.relative_port,
                port_group=self.port_group, extra=self.extra_designators()),
        }
        pages.update(self.vpd_pages())
        pages[VpdPage.SUPPORTED_PAGES] = supported_pages_payload([*pages, 0x00])
        return pages

    def supported_commands(self) -> list[tuple[int, int | None]]:
        """(opcode, service action) of every command this LU answers, for RSOC."""
        sas = self.service_actions()
        out: list[tuple[int, int | None]] = []
        for op in sorted(self._handlers):
            if op in _RESERVE_OPCODES and not self.supports_reserve6:
                continue
            if op in sas:
                out.extend((op, sa) for sa in sorted(sas[op]))
            else:
                out.append((op, None))
        return out

    # --- dispatcher hook: reservations -----------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        holder = self.reserved_by
        if holder is not None and holder != cmd.nexus and cmd.cdb:
            op = cmd.cdb[0]
            if (op in self._handlers and op not in self.reservation_exempt
                    and not self._queue(cmd.nexus).pending):
                return ScsiResult(ScsiStatus.RESERVATION_CONFLICT)
        return super().execute(cmd)

    # --- commands --------------------------------------------------------------------------
    @command(SpcOpcode.TEST_UNIT_READY)
    def _test_unit_ready(self, req: Request) -> bytes:
        """SPC-4 6.47."""
        req.need_cdb(6)
        self.ready()
        return b""

    @command(SpcOpcode.INQUIRY)
    def _inquiry(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.6: standard data, or the VPD page PAGE CODE names when EVPD is set."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFE)  # CMDDT (bit 1) is obsolete: reserved in SPC-4
        cdb = req.cdb
        evpd, page, alloc = cdb[1] & 0x01, cdb[2], u16(cdb, 3)
        if not evpd:
            if page:
                raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
            return req.reply(self.standard_inquiry().encode(), alloc)
        payload = self.vpd_payloads().get(page)
        if payload is None:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
        return req.reply(vpd_page(self.peripheral_byte, page, payload), alloc)

    @command(SpcOpcode.REQUEST_SENSE)
    def _request_sense(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.39: pending UA first, else the not-ready state, else NO SENSE."""
        req.need_cdb(6)
        req.check_reserved(1, 0xFE)
        sense = self.current_sense(req.nexus)
        data = descriptor_sense(sense) if req.cdb[1] & 0x01 else sense
        return req.reply(data, req.cdb[4])

    def current_sense(self, nexus: str) -> bytes:
        """The sense REQUEST SENSE reports (and consumes, for a unit attention)."""
        if self._queue(nexus).pending:
            return self.take_sense(nexus)
        try:
            self.ready()
        except SenseError as err:
            return err.encode()
        return self.take_sense(nexus)

    @command(SpcOpcode.MODE_SENSE_6, SpcOpcode.MODE_SENSE_10)
    def _mode_sense(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.11 / 6.12."""
        ten = req.opcode == SpcOpcode.MODE_SENSE_10
        req.need_cdb(10 if ten else 6)
        req.check_reserved(1, 0xE7 if ten else 0xF7)
        cdb = req.cdb
        dbd, llbaa = bool(cdb[1] & 0x08), ten and bool(cdb[1] & 0x10)
        pc = PageControl(cdb[2] >> 6)
        alloc = u16(cdb, 7) if ten else cdb[4]
        chosen = select_pages(self.mode_pages(), cdb[2] & 0x3F, cdb[3])
        if pc is PageControl.SAVED:
            if not all(p.saveable for p in chosen):
                raise SenseError(SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED,
                                 field=FieldPointer(2, 7))
            pc = PageControl.CURRENT
        descriptors = b""
        long_lba = False
        desc = None if dbd else self.block_descriptor()
        if desc is not None:
            fmt = self.descriptor_format
            if fmt is not DescriptorFormat.GENERAL:
                fmt = DescriptorFormat.LONG_LBA if llbaa else DescriptorFormat.SHORT_LBA
                long_lba = llbaa
            descriptors = desc.encode(fmt)
        header = ModeParameterHeader(medium_type=self.medium_type(),
                                     device_specific=self.device_specific_parameter(),
                                     long_lba=long_lba)
        data = build_mode_data(ten=ten, header=header, descriptors=descriptors,
                               pages=[p.encode(pc) for p in chosen])
        return req.reply(data, alloc)

    @command(SpcOpcode.MODE_SELECT_6, SpcOpcode.MODE_SELECT_10)
    def _mode_select(self, req: Request) -> ScsiResult | bytes:
        """SPC-4 6.9 / 6.10: all-or-nothing validation, then apply."""
        ten = req.opcode == SpcOpcode.MODE_SELECT_10
        req.need_cdb(10 if ten else 6)
        req.check_reserved(1, 0xEE)
        cdb = req.cdb
        pf, sp = bool(cdb[1] & 0x10), bool(cdb[1] & 0x01)
        pll = u16(cdb, 7) if ten else cdb[4]
        data = bytes(req.data_out[:pll])
        pages = self.mode_pages()
        if pll == 0:  # SPC-4 6.9: no data is transferred, not an error
            if sp and not any(p.saveable for p in pages):
                raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
            return self._select_result(req, pll)
        fmt = self.descriptor_format if self.block_descriptor() is not None else None
        parsed = parse_mode_select(data, ten=ten, pages=pages, descriptor_format=fmt,
                                   page_format=pf)
        if sp and (not parsed.updates or not all(u.page.saveable for u in parsed.updates)):
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=0)
        if parsed.descriptor is not None:
            try:
                self.apply_block_descriptor(parsed.descriptor)
            except SenseError as err:
                raise rebase_field(err, parsed.descriptor_offset) from None
        self.apply_mode_header(parsed.header.medium_type, parsed.header.device_specific)
        if apply_updates(parsed.updates):
            for nexus in list(self._ua):
                if nexus != req.nexus:
                    self.unit_attention(Asc.MODE_PARAMETERS_CHANGED, nexus)
        return self._select_result(req, pll)

    @staticmethod
    def _select_result(req: Request, pll: int) -> ScsiResult | bytes:
        if len(req.data_out) != pll:
            return ScsiResult(ScsiStatus.GOOD, b"", data_out_expected=pll)
        return b""

    @command(SpcOpcode.MAINTENANCE_IN)
    def _maintenance_in(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.x: MAINTENANCE IN, dispatched on its SERVICE ACTION."""
        req.need_cdb(12)
        req.check_reserved(1, 0xE0)
        handler = self.maintenance_in_actions().get(req.cdb[1] & 0x1F)
        if handler is None:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=4)
        return handler(req)

    def _report_supported_opcodes(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.35 REPORT SUPPORTED OPERATION CODES, reporting options 000b-011b."""
        cdb = req.cdb
        req.check_reserved(2, 0x78)
        rctd = bool(cdb[2] & 0x80)
        option = cdb[2] & 0x07
        op, rsa, alloc = cdb[3], u16(cdb, 4), u32(cdb, 6)
        timeouts = _TIMEOUTS.pack(0x0A, 0, 0, 0) if rctd else b""
        if option == 0:
            body = bytearray()
            for opcode, sa in self.supported_commands():
                usage = self.cdb_usage(opcode, sa)
                if usage is None:
                    continue
                flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
                body += _COMMAND_DESCRIPTOR.pack(opcode, sa or 0, flags, len(usage)) + timeouts
            return req.reply(struct.pack(">I", len(body)) + bytes(body), alloc)
        if option > 3:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2, bit=2)
        sas = self.service_actions()
        has_sa = op in sas or (op not in self._handlers and op in SERVICE_ACTION_IN_BYTE1)
        if option == 1 and has_sa:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2, bit=2)
        if option == 2 and not has_sa:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2, bit=2)
        sa: int | None = rsa if has_sa else None
        usage = self.cdb_usage(op, sa) if (op, sa) in self.supported_commands() else None
        if usage is None:
            return req.reply(_ONE_COMMAND_HEAD.pack(_SUPPORT_NOT_SUPPORTED, 0), alloc)
        head = _ONE_COMMAND_HEAD.pack((0x80 if rctd else 0) | _SUPPORT_STANDARD, len(usage))
        return req.reply(head + usage + timeouts, alloc)

    @command(SpcOpcode.REPORT_LUNS)
    def _report_luns(self, req: Request) -> bytes | memoryview:
        """SPC-4 6.33 for a stand-alone LU (a ScsiTarget answers it for all its LUNs)."""
        lun = req.cmd.lun
        return report_luns_data(req.cdb, [lun] if 0 <= lun <= MAX_LUN else [])

    @command(SpcOpcode.RESERVE_6, SpcOpcode.RESERVE_10)
    def _reserve(self, req: Request) -> ScsiResult | bytes:
        """SPC-2 7.21 / 7.22: reserve the whole LU for this I_T nexus."""
        self._check_reserve_cdb(req)
        if self.reserved_by is not None and self.reserved_by != req.nexus:
            return ScsiResult(ScsiStatus.RESERVATION_CONFLICT)
        self.reserved_by = req.nexus
        return b""

    @command(SpcOpcode.RELEASE_6, SpcOpcode.RELEASE_10)
    def _release(self, req: Request) -> bytes:
        """SPC-2 7.17 / 7.18: release if held by this nexus; otherwise GOOD, nothing changes."""
        self._check_reserve_cdb(req)
        if self.reserved_by == req.nexus:
            self.reserved_by = None
        return b""

    def _check_reserve_cdb(self, req: Request) -> None:
        if not self.supports_reserve6:
            raise illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE, byte=0)
        ten = req.opcode in (SpcOpcode.RESERVE_10, SpcOpcode.RELEASE_10)
        req.need_cdb(10 if ten else 6)
        if ten:
            req.check_reserved(1, 0x12)  # third-party and LONGID reservations: not supported
        else:
            req.check_reserved(1, 0x01)  # extent reservations: obsolete, not supported
