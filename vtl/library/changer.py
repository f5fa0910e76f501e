"""The SCSI media changer (SMC-3): element inventory, READ ELEMENT STATUS, MOVE MEDIUM.

The changer is a pure state machine over the element map (``vtl.library.elements``): it knows
which medium sits in which element and drives the tape drives' ``load``/``unload``. Everything
that touches files or the catalog goes through the :class:`MediumStore` protocol that the
library implements: ``mount``/``unmount`` open and close cartridges, ``moved`` persists a move
(in a short transaction) *before* the command completes, so a crash never loses a move that an
initiator saw succeed.

Invariants:
- The medium transport element never holds a medium (moves are atomic).
- A medium is in exactly one element; ``self._contents`` is the only inventory.
- A failed MOVE MEDIUM leaves inventory, drives and store as they were.
- Inventory changes the initiator did not make (new tapes, tapes leaving) raise a UNIT
  ATTENTION on every nexus: 28/01 IMPORT OR EXPORT ELEMENT ACCESSED for I/E elements, 28/00
  NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED for any other element (SMC-3 unit attention conditions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping, Protocol, Sequence

from vtl.library.elements import (
    DeviceIdentifier,
    ElementDescriptor,
    ElementLayout,
    ElementStatusData,
    ElementType,
    Flag,
    MediumType,
    VolumeTag,
    group_pages,
)
from vtl.library.identities import DeviceIdentity
from vtl.scsi.cdb import SmcOpcode, u16, u24
from vtl.scsi.inquiry import VersionDescriptor
from vtl.scsi.lu import Request, command
from vtl.scsi.modepages import ModePage
from vtl.scsi.sense import Asc, SenseError, SenseKey, illegal_request
from vtl.scsi.spc import SpcDevice

PERIPHERAL_TYPE_CHANGER = 0x08


@dataclass(frozen=True, slots=True)
class Medium:
    """A cartridge inside the library, as the changer sees it.

    ``source`` is the SMC-3 SOURCE STORAGE ELEMENT ADDRESS: the last storage or import/export
    element the medium was moved from (None until the first move). ``imported`` is true for a
    medium an operator (the appliance) placed in an I/E element (IMPEXP=1), false for one the
    medium transport put there (an export).
    """

    barcode: str
    source: int | None = None
    worm: bool = False
    imported: bool = False


class Drive(Protocol):
    """What the changer needs of a tape drive (``vtl.library.drive.TapeDrive``)."""

    def load(self, cartridge: Any, *, read_only: bool = False) -> None: ...

    def unload(self, *, force: bool = False) -> Any: ...

    def begin_load(self, barcode: str) -> None: ...

    @property
    def removal_prevented(self) -> bool: ...


class MediumStore(Protocol):
    """The persistence and file side of the library, called by the changer.

    ``mount`` opens the cartridge of ``barcode`` for a drive and says whether it is read-only
    (raise SenseError when it may not be loaded); a cartridge of None means its data is still
    being fetched: the drive is told to :meth:`Drive.begin_load` and the store calls
    :meth:`MediaChanger.complete_load` when the data is there; ``unmount`` releases a
    cartridge a drive gave back (``cartridge`` may be None); ``moved`` persists a completed move (new element, source
    address, status effects, events) and must raise if it could not.
    """

    def mount(self, barcode: str) -> tuple[Any, bool]: ...

    def unmount(self, barcode: str, cartridge: Any) -> None: ...

    def moved(self, medium: Medium, source: int, destination: int) -> None: ...


class InventoryError(Exception):
    """An inventory change requested by the appliance (not by SCSI) is impossible."""


def _element_address_page(layout: ElementLayout) -> bytes:
    """SMC-3 Element Address Assignment mode page (1Dh), 18 bytes of parameters."""
    t = ElementType
    fields = []
    for kind in (t.MEDIUM_TRANSPORT, t.STORAGE, t.IMPORT_EXPORT, t.DATA_TRANSFER):
        fields += [layout.first(kind), layout.count(kind)]
    return b"".join(v.to_bytes(2, "big") for v in fields) + bytes(2)


def _transport_geometry_page(layout: ElementLayout) -> bytes:
    """SMC-3 Transport Geometry Parameters mode page (1Eh): per transport, ROTATE=0
    and MEMBER NUMBER IN TRANSPORT ELEMENT SET."""
    return b"".join(bytes([0, i]) for i in range(layout.transports))


def _device_capabilities_page() -> bytes:
    """SMC-3 Device Capabilities mode page (1Fh), 18 bytes of parameters.

    Byte 2: storage capable for ST, I/E and DT (not MT). Bytes 4-7: MOVE MEDIUM from MT/ST/IE/DT
    to ST, IE and DT (bits ->DT 3, ->IE 2, ->ST 1, ->MT 0). EXCHANGE MEDIUM is not supported.
    """
    to_any = 0b1110
    return bytes([0b1110, 0, 0, to_any, to_any, to_any]) + bytes(12)


class MediaChanger(SpcDevice):
    """SMC-3 medium changer, peripheral device type 8."""

    peripheral_type = PERIPHERAL_TYPE_CHANGER
    removable = True

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        serial: str,
        layout: ElementLayout,
        drives: Sequence[Drive],
        drive_identifiers: Sequence[DeviceIdentifier],
        store: MediumStore,
        contents: Mapping[int, Medium] | None = None,
        device_name: str = "",
    ) -> None:
        super().__init__(vendor=identity.vendor, product=identity.product,
                         revision=identity.revision, serial=serial, device_name=device_name)
        if len(drives) != layout.drives or len(drive_identifiers) != layout.drives:
            raise ValueError("one drive and one identifier per data transfer element")
        self.identity = identity
        self.layout = layout
        self._drives = list(drives)
        self._drive_ids = list(drive_identifiers)
        self._store = store
        self._contents: dict[int, Medium] = {}
        self._prevent: set[str] = set()  # nexuses holding PREVENT MEDIUM REMOVAL
        self._smc_pages = [  # constant: nothing in them is changeable
            ModePage(0x1D, default=_element_address_page(layout)),
            ModePage(0x1E, default=_transport_geometry_page(layout)),
            ModePage(0x1F, default=_device_capabilities_page()),
        ]
        for address, medium in (contents or {}).items():
            kind = layout.type_of(address)
            if kind is None or kind == ElementType.MEDIUM_TRANSPORT:
                raise ValueError(f"medium {medium.barcode} at unusable address 0x{address:04x}")
            if self.locate(medium.barcode) is not None:
                raise ValueError(f"medium {medium.barcode} in two elements")
            self._contents[address] = medium

    # --- inventory, for the library ---------------------------------------------------------
    @property
    def contents(self) -> Mapping[int, Medium]:
        return MappingProxyType(self._contents)

    def locate(self, barcode: str) -> int | None:
        for address, medium in self._contents.items():
            if medium.barcode == barcode:
                return address
        return None

    def drive(self, index: int) -> Drive:
        return self._drives[index]

    def free_addresses(self, kind: ElementType) -> list[int]:
        return [a for a in self.layout.addresses(kind) if a not in self._contents]

    def occupancy(self, kind: ElementType) -> int:
        return sum(1 for a in self.layout.addresses(kind) if a in self._contents)

    @property
    def removal_prevented(self) -> bool:
        """True while any initiator holds PREVENT MEDIUM REMOVAL on the changer: then the
        appliance must not take media out through the I/E elements (SMC-3 PREVENT ALLOW MEDIUM REMOVAL)."""
        return bool(self._prevent)

    def insert(self, medium: Medium, address: int | None = None) -> int:
        """Place a medium from outside (a new tape, a retrieved tape) into ``address`` or the
        first free I/E element, then raise a UNIT ATTENTION. The caller persists it."""
        if self.locate(medium.barcode) is not None:
            raise InventoryError(f"tape {medium.barcode} is already in the library")
        if address is None:
            free = self.free_addresses(ElementType.IMPORT_EXPORT)
            if not free:
                raise InventoryError("no free import/export slot")
            address = free[0]
        kind = self.layout.type_of(address)
        if kind not in (ElementType.STORAGE, ElementType.IMPORT_EXPORT):
            raise InventoryError(f"0x{address:04x} is not a slot")
        if address in self._contents:
            raise InventoryError(f"element 0x{address:04x} is full")
        self._contents[address] = medium
        self._changed(kind)
        return address

    def remove(self, address: int) -> Medium:
        """Take a medium out of a slot (deleted, or archived from an I/E slot), raise a UA."""
        medium = self._contents.get(address)
        if medium is None:
            raise InventoryError(f"element 0x{address:04x} is empty")
        kind = self.layout.type_of(address)
        if kind == ElementType.DATA_TRANSFER:
            raise InventoryError(f"tape {medium.barcode} is in a drive; unload it first")
        del self._contents[address]
        assert kind is not None
        self._changed(kind)
        return medium

    def set_identity(self, identity: DeviceIdentity) -> None:
        """Change the INQUIRY strings (SetChangerType): 3F/03 INQUIRY DATA HAS CHANGED."""
        self.identity = identity
        self.vendor, self.product, self.revision = (identity.vendor, identity.product,
                                                    identity.revision)
        self.unit_attention(Asc.INQUIRY_DATA_HAS_CHANGED)

    def _changed(self, kind: ElementType) -> None:
        self.unit_attention(Asc.IMPORT_OR_EXPORT_ELEMENT_ACCESSED
                            if kind == ElementType.IMPORT_EXPORT
                            else Asc.NOT_READY_TO_READY_CHANGE)

    # --- SPC hooks ------------------------------------------------------------------------
    def version_descriptors(self) -> list[int]:
        return [*super().version_descriptors(), VersionDescriptor.SMC_3]

    def mode_pages(self) -> list[ModePage]:
        return [*super().mode_pages(), *self._smc_pages]

    def block_descriptor(self) -> None:
        return None

    def forget_nexus(self, nexus: str) -> None:
        self._prevent.discard(nexus)
        super().forget_nexus(nexus)

    def reset(self) -> None:
        """LOGICAL UNIT RESET clears PREVENT MEDIUM REMOVAL (SPC-4 6.13)."""
        self._prevent.clear()
        super().reset()

    # --- element status ---------------------------------------------------------------------
    def descriptor(self, address: int, *, voltag: bool, dvcid: bool) -> ElementDescriptor:
        """The current status of one element (SMC-3 READ ELEMENT STATUS element descriptors)."""
        kind = self.layout.type_of(address)
        if kind is None:
            raise ValueError(f"no element 0x{address:04x}")
        medium = self._contents.get(address)
        flags = Flag.FULL if medium is not None else Flag(0)
        identifier = None
        if kind == ElementType.STORAGE:
            flags |= Flag.ACCESS
        elif kind == ElementType.IMPORT_EXPORT:
            flags |= Flag.ACCESS | Flag.INENAB | Flag.EXENAB
            if medium is not None and medium.imported:
                flags |= Flag.IMPEXP
        elif kind == ElementType.DATA_TRANSFER:
            index = self.layout.drive_index(address)
            if medium is None or not self._drives[index].removal_prevented:
                flags |= Flag.ACCESS
            if dvcid:
                identifier = self._drive_ids[index]
        return ElementDescriptor(
            address=address,
            kind=kind,
            flags=flags,
            source=medium.source if medium is not None else None,
            volume_tag=VolumeTag(medium.barcode) if (voltag and medium is not None) else None,
            medium_type=(MediumType.UNSPECIFIED if medium is None
                         else MediumType.WORM if medium.worm else MediumType.DATA),
            identifier=identifier,
        )

    def element_status(self, kind: ElementType, start: int, count: int, *,
                       voltag: bool, dvcid: bool) -> ElementStatusData:
        """SMC-3 READ ELEMENT STATUS: elements of ``kind`` (ALL = every type) with address >= ``start``, in
        address order, at most ``count``. ILLEGAL REQUEST 21/01 when none has such an address
        (the starting address lies past every element of that type)."""
        if kind == ElementType.ALL:
            candidates = [a for a in self.layout.all_addresses() if a >= start]
        else:
            candidates = [a for a in self.layout.addresses(kind) if a >= start]
        if not candidates:
            raise illegal_request(Asc.INVALID_ELEMENT_ADDRESS, byte=2)
        chosen = candidates[:count]
        descriptors = [self.descriptor(a, voltag=voltag, dvcid=dvcid) for a in chosen]
        return ElementStatusData(group_pages(descriptors, voltag))

    @command(SmcOpcode.READ_ELEMENT_STATUS)
    def _read_element_status(self, req: Request) -> bytes | memoryview:
        """SMC-3 READ ELEMENT STATUS CDB: VOLTAG (byte 1 bit 4), ELEMENT TYPE CODE (byte 1 bits 3-0), STARTING
        ELEMENT ADDRESS (2-3), NUMBER OF ELEMENTS (4-5), CURDATA/DVCID (byte 6 bits 1/0),
        ALLOCATION LENGTH (7-9). The data is cut at the allocation length; the header still
        reports every byte available."""
        req.need_cdb(12)
        cdb = req.cdb
        try:
            kind = ElementType(cdb[1] & 0x0F)
        except ValueError:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1, bit=3) from None
        # CURDATA (bit 1) needs nothing: the inventory is always current, no robot moves.
        data = self.element_status(kind, u16(cdb, 2), u16(cdb, 4),
                                   voltag=bool(cdb[1] & 0x10), dvcid=bool(cdb[6] & 0x01))
        return req.reply(data.encode(), u24(cdb, 7))

    # --- moves ----------------------------------------------------------------------------
    def _element(self, address: int, byte: int) -> ElementType:
        kind = self.layout.type_of(address)
        if kind is None:
            raise illegal_request(Asc.INVALID_ELEMENT_ADDRESS, byte=byte)
        return kind

    def _check_transport(self, address: int, byte: int) -> None:
        """Address 0 means "the default transport"; else it must be a transport element."""
        if address != 0 and self.layout.type_of(address) != ElementType.MEDIUM_TRANSPORT:
            raise illegal_request(Asc.INVALID_ELEMENT_ADDRESS, byte=byte)

    def move_medium(self, source: int, destination: int) -> None:
        """SMC-3 MOVE MEDIUM, with the checks in the order an initiator can rely on:
        invalid address 21/01, source empty 3B/0E, destination full 3B/0D; a drive whose
        medium removal is prevented answers 53/02 (raised by the drive's unload)."""
        src_kind = self._element(source, 4)
        dst_kind = self._element(destination, 6)
        if dst_kind == ElementType.MEDIUM_TRANSPORT:
            raise illegal_request(Asc.INVALID_ELEMENT_ADDRESS, byte=6)
        medium = self._contents.get(source)
        if medium is None:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_SOURCE_ELEMENT_EMPTY)
        if source == destination:
            return
        if destination in self._contents:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_DESTINATION_ELEMENT_FULL)

        src_drive = (self._drives[self.layout.drive_index(source)]
                     if src_kind == ElementType.DATA_TRANSFER else None)
        dst_drive = (self._drives[self.layout.drive_index(destination)]
                     if dst_kind == ElementType.DATA_TRANSFER else None)
        moved = replace(
            medium,
            source=source if src_kind in (ElementType.STORAGE, ElementType.IMPORT_EXPORT)
            else medium.source,
            imported=False,
        )

        if src_drive is not None:
            cartridge = src_drive.unload(force=False)  # SenseError 53/02 when prevented
            self._store.unmount(medium.barcode, cartridge)
        try:
            if dst_drive is not None:
                self._mount_into(dst_drive, medium.barcode)
            try:
                self._store.moved(moved, source, destination)
            except BaseException:
                if dst_drive is not None:
                    self._store.unmount(medium.barcode, dst_drive.unload(force=True))
                raise
        except BaseException:
            if src_drive is not None:  # put the cartridge back where it was
                self._mount_into(src_drive, medium.barcode)
            raise
        del self._contents[source]
        self._contents[destination] = moved

    def _mount_into(self, drive: Drive, barcode: str) -> None:
        cartridge, read_only = self._store.mount(barcode)
        if cartridge is None:  # the data is on its way: the drive is becoming ready
            drive.begin_load(barcode)
            return
        try:
            drive.load(cartridge, read_only=read_only)
        except BaseException:
            self._store.unmount(barcode, cartridge)
            raise

    def complete_load(self, barcode: str) -> bool:
        """The data of a tape put into a drive by a deferred mount is local now: load it, if
        the tape is still in a drive that is becoming ready with it. Returns True if loaded."""
        for address, medium in self._contents.items():
            if (medium.barcode != barcode
                    or self.layout.type_of(address) != ElementType.DATA_TRANSFER):
                continue
            drive = self._drives[self.layout.drive_index(address)]
            if getattr(drive, "becoming_ready", None) != barcode:
                return False
            self._mount_into(drive, barcode)
            return getattr(drive, "becoming_ready", None) != barcode
        return False

    @command(SmcOpcode.MOVE_MEDIUM)
    def _move_medium(self, req: Request) -> bytes:
        """SMC-3 MOVE MEDIUM CDB: TRANSPORT (2-3), SOURCE (4-5), DESTINATION (6-7), INVERT (byte 10 bit 0,
        not supported: media have one side)."""
        req.need_cdb(12)
        cdb = req.cdb
        if cdb[10] & 0x01:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=10, bit=0)
        self._check_transport(u16(cdb, 2), 2)
        self.move_medium(u16(cdb, 4), u16(cdb, 6))
        return b""

    @command(SmcOpcode.POSITION_TO_ELEMENT)
    def _position_to_element(self, req: Request) -> bytes:
        """SMC-3 POSITION TO ELEMENT: nothing to position; validate TRANSPORT (2-3), DESTINATION (4-5), INVERT."""
        req.need_cdb(10)
        cdb = req.cdb
        if cdb[8] & 0x01:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=8, bit=0)
        self._check_transport(u16(cdb, 2), 2)
        self._element(u16(cdb, 4), 4)
        return b""

    @command(SmcOpcode.INITIALIZE_ELEMENT_STATUS)
    def _initialize_element_status(self, req: Request) -> bytes:
        """SMC-3 INITIALIZE ELEMENT STATUS: the inventory is always known; nothing to scan."""
        req.need_cdb(6)
        return b""

    @command(SmcOpcode.INITIALIZE_ELEMENT_STATUS_WITH_RANGE)
    def _initialize_element_status_with_range(self, req: Request) -> bytes:
        """SMC-3 INITIALIZE ELEMENT STATUS WITH RANGE: RANGE (byte 1 bit 0) with STARTING ELEMENT ADDRESS (2-3) and NUMBER OF
        ELEMENTS (6-7); an address that is no element is 21/01."""
        req.need_cdb(10)
        cdb = req.cdb
        if cdb[1] & 0x01:
            self._element(u16(cdb, 2), 2)
        return b""

    @command(SmcOpcode.PREVENT_ALLOW_MEDIUM_REMOVAL)
    def _prevent_allow(self, req: Request) -> bytes:
        """SMC-3 / SPC-4 PREVENT ALLOW MEDIUM REMOVAL: PREVENT (byte 4 bits 1-0) 00b allow, 01b prevent removal of
        media from the library through the I/E elements. Held per I_T nexus."""
        req.need_cdb(6)
        prevent = req.cdb[4] & 0x03
        if prevent > 1:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=4, bit=1)
        if prevent:
            self._prevent.add(req.nexus)
        else:
            self._prevent.discard(req.nexus)
        return b""
