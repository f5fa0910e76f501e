"""The tape library service: changer + drives + catalog + iSCSI targets, and its control ops.

This is the I/O edge of the library: it opens cartridges, writes the catalog, reads the clock.
The changer (``changer.py``) stays pure and calls back through :class:`MediumStore`, which
:class:`Library` implements: every move is persisted (tapes.element_address/source_address,
status effects, an events row) in one short transaction before MOVE MEDIUM completes.

Targets (one per device, LUN 0, FACTS.md): ``<authority>:<gateway-id>-mediachanger`` and
``...-tapedrive-01`` .. ``-10``; version sort order puts drive 0 first.

Status effects of moves (lifecycle.py): a tape the initiator moves into an I/E slot is exported
(AVAILABLE -> IN TRANSIT TO VTS); moving it out of the I/E slot again before archiving starts
cancels the export (-> AVAILABLE). ``take_for_archive`` (for the archiving job) removes an
exported tape from its I/E slot unless an initiator holds PREVENT MEDIUM REMOVAL.

Tape JSON (ListTapes / DescribeTape, stable names): ``barcode, status, size_bytes, used_bytes,
pool, worm, location, target_iqn, created_at`` where ``location`` is
``{"type": "slot"|"ie"|"drive"|"shelf"|"none", "address": int|None, "mtx": int|None}``:
``mtx`` is the mtx slot number for slot/ie (storage 1..N, I/E N+1..N+M) and the drive index
(mtx "Data Transfer Element") for a drive; "shelf" = outside the library (archived),
"none" = deleted. ``target_iqn`` is the drive's target for a tape in a drive, else None.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from catalog import pools as pq
from catalog import tapes as q
from catalog.db import Catalog
from vtl.errors import ApplianceError, Conflict, InvalidRequest, LimitExceeded, NotFound
from vtl.iscsi.target import IscsiTarget, Targets
from vtl.library import barcodes
from vtl.library.cartridge import META_NAME, Cartridge, CartridgeError, has_evicted_segments
from vtl.library.changer import MediaChanger, Medium
from vtl.library.drive import TapeDrive
from vtl.library.elements import DeviceIdentifier, ElementLayout, ElementType
from vtl.library.identities import (
    CHANGER_TYPES,
    changer_identity,
    changer_serial,
    drive_device_identifier,
    drive_serial,
)
from vtl.library.lifecycle import IN_LIBRARY, LOADABLE, READ_ONLY, TapeStatus, check_transition
from vtl.scsi.sense import Asc, SenseError, SenseKey
from vtl.scsi.target import ScsiTarget

log = logging.getLogger(__name__)

GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50

CHANGER_TYPE_SETTING = "changer_type"
POOLS = ("glacier", "deep-archive")

Op = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class CartridgeRef:
    """A cartridge named, not opened: what the changer hands to a drive in another process,
    which opens (and flocks) it itself. ``used_bytes`` comes back with an unload."""

    barcode: str
    path: Path
    used_bytes: int | None = None


class DriveHost(Protocol):
    """Drives served elsewhere (``vtl.engine.workers.WorkerPool``): declared with ``attach``,
    started with ``start``, then ``drive(i)`` is the changer-facing proxy of drive ``i`` and
    ``device(i)`` the stand-in SCSI device of its target in this process."""

    def attach(self, index: int, serial: str, target_iqn: str, alias: str) -> None: ...

    def start(self) -> None: ...

    def drive(self, index: int) -> Any: ...

    def device(self, index: int) -> Any: ...

    def status(self) -> dict[int, dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """AWS Tape Gateway limits (FACTS.md)."""

    min_tape_bytes: int = 100 * GiB
    max_tape_bytes: int = 15 * TiB
    max_tapes: int = 1500
    max_total_bytes: int = PiB
    max_per_call: int = 10


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Library:
    """One virtual tape library of a gateway. ``start()``, serve, ``close()``."""

    def __init__(self, catalog: Catalog, data_dir: Path, targets: Targets, authority: str,
                 gateway_id: str, *, changer_type: str | None = None,
                 layout: ElementLayout | None = None, limits: Limits | None = None,
                 clock: Callable[[], datetime] = _utc_now,
                 drive_host: DriveHost | None = None) -> None:
        self.catalog = catalog
        self.drive_host = drive_host
        self.db = catalog.db
        self.data_dir = Path(data_dir)
        self.targets = targets
        self.authority = authority
        self.gateway_id = gateway_id
        self.layout = layout or ElementLayout()
        self.limits = limits or Limits()
        self._clock = clock
        self._requested_type = changer_type
        self.changer: MediaChanger | None = None
        self.drives: list[TapeDrive] = []
        #: Hook run before a cartridge is opened for a drive (the cloud tier fetches evicted
        #: segments back). It returns None when the tape is local, or a pending fetch (an
        #: object with ``add_done_callback(fn)``, fn called on this library's event loop
        #: thread): the drive then reports "becoming ready" until the fetch is done, and the
        #: changer loads the tape then (the loop never waits for the network).
        self.before_mount: Callable[[str], Any] | None = None
        #: Set by the cloud tier: a deleted tape stays DELETING until a job has removed its
        #: objects from the store (then DELETED); without it a deletion is immediate.
        self.defer_delete = False

    def _rehome(self, orphans: list[Any], contents: dict[int, Medium]) -> None:
        """Tapes whose element no longer exists go to the first free storage (else I/E) slot."""
        free = [a for kind in (ElementType.STORAGE, ElementType.IMPORT_EXPORT)
                for a in self.layout.addresses(kind) if a not in contents]
        for row in orphans:
            if not free:
                log.error("no free slot for tape %s (element 0x%04x is gone); it stays off-line "
                          "until slots are added", row["barcode"], row["element_address"])
                q.update_tape(self.db, row["barcode"], element_address=None)
                continue
            address = free.pop(0)
            log.warning("tape %s: element 0x%04x no longer exists; placed in element 0x%04x",
                        row["barcode"], row["element_address"], address)
            q.update_tape(self.db, row["barcode"], element_address=address,
                          source_address=address)
            contents[address] = Medium(
                barcode=row["barcode"], source=address, worm=bool(row["worm"]),
                imported=row["status"] != TapeStatus.IN_TRANSIT_TO_VTS.value)

    # --- names ----------------------------------------------------------------------------
    @property
    def changer_iqn(self) -> str:
        return f"{self.authority}:{self.gateway_id.lower()}-mediachanger"

    def drive_iqn(self, index: int) -> str:
        return f"{self.authority}:{self.gateway_id.lower()}-tapedrive-{index + 1:02d}"

    def tape_dir(self, barcode: str) -> Path:
        return self.data_dir / "cache" / "tapes" / barcode

    def _now(self) -> str:
        return self._clock().astimezone(timezone.utc).isoformat(timespec="seconds")

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load the inventory from the catalog, build the devices, register the targets."""
        if self.changer is not None:
            raise RuntimeError("library already started")
        type_name = self._requested_type or self.catalog.get_setting(CHANGER_TYPE_SETTING)
        try:
            identity = changer_identity(type_name)
        except KeyError as exc:
            raise InvalidRequest(str(exc.args[0])) from None
        if self._requested_type:
            self.catalog.set_setting(CHANGER_TYPE_SETTING, identity.type_name)
        serials = [drive_serial(self.gateway_id, i) for i in range(self.layout.drives)]
        host = self.drive_host
        if host is not None:
            for i in range(self.layout.drives):
                host.attach(i, serials[i], self.drive_iqn(i), self._drive_alias(i))
            host.start()
            self.drives = [host.drive(i) for i in range(self.layout.drives)]
        else:
            self.drives = [TapeDrive(index=i, serial=serials[i], device_name=self.drive_iqn(i))
                           for i in range(self.layout.drives)]
        contents: dict[int, Medium] = {}
        orphans: list[Any] = []
        for row in q.tapes_in_elements(self.db):
            address = row["element_address"]
            kind = self.layout.type_of(address)
            if kind is None or kind == ElementType.MEDIUM_TRANSPORT:
                orphans.append(row)  # the element map shrank (vtl serve --slots/--ie-slots)
                continue
            contents[address] = Medium(
                barcode=row["barcode"], source=row["source_address"], worm=bool(row["worm"]),
                imported=row["status"] != TapeStatus.IN_TRANSIT_TO_VTS.value)
            if kind == ElementType.DATA_TRANSFER:
                drive = self.drives[self.layout.drive_index(address)]
                if has_evicted_segments(self.tape_dir(row["barcode"])):
                    # stopped while its data was being fetched back: the cloud tier fetches
                    # it again at its start and the changer loads it then
                    drive.begin_load(row["barcode"])
                    continue
                try:
                    cartridge, read_only = self.mount(row["barcode"])
                    drive.load(cartridge, read_only=read_only)
                except (SenseError, OSError, ValueError) as exc:
                    log.error("cannot reload tape %s into drive %d: %s", row["barcode"],
                              self.layout.drive_index(address), exc)
        self._rehome(orphans, contents)
        self.changer = MediaChanger(
            identity=identity,
            serial=changer_serial(self.gateway_id),
            layout=self.layout,
            drives=self.drives,
            drive_identifiers=[self._dvcid(s) for s in serials],
            store=self,
            contents=contents,
            device_name=self.changer_iqn,
        )
        self.targets.add(IscsiTarget(name=self.changer_iqn, device=ScsiTarget({0: self.changer}),
                                     alias=f"{self.gateway_id} media changer"))
        for i, drive in enumerate(self.drives):
            device = host.device(i) if host is not None else ScsiTarget({0: drive})
            self.targets.add(IscsiTarget(name=self.drive_iqn(i), device=device,
                                         alias=self._drive_alias(i)))

    def _drive_alias(self, index: int) -> str:
        return f"{self.gateway_id} tape drive {index + 1}"

    @staticmethod
    def _dvcid(serial: str) -> DeviceIdentifier:
        d = drive_device_identifier(serial)
        return DeviceIdentifier(int(d.code_set), int(d.designator_type), d.value)

    def close(self) -> None:
        """Unregister the targets, flush and close every loaded cartridge."""
        if self.changer is None:
            return
        self.targets.remove(self.changer_iqn)
        for i, drive in enumerate(self.drives):
            self.targets.remove(self.drive_iqn(i))
            barcode = drive.barcode
            try:
                cartridge = drive.unload(force=True)
            except SenseError:
                cartridge = None
            if cartridge is not None:
                self.unmount(barcode or cartridge.barcode, cartridge)
            drive.close()
        self.changer.close()
        self.changer = None

    def _need_changer(self) -> MediaChanger:
        if self.changer is None:
            raise ApplianceError("the tape library is not started", code="GatewayNotStarted")
        return self.changer

    # --- MediumStore (called by the changer) ----------------------------------------------
    def mount(self, barcode: str) -> tuple[Cartridge, bool]:
        """Open a tape's cartridge for a drive. Only AVAILABLE and RETRIEVED (read-only) tapes
        load; an exported tape still in its I/E slot loads too (the move cancels the export)."""
        row = q.get_tape(self.db, barcode)
        if row is None:
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.MEDIUM_LOAD_OR_EJECT_FAILED)
        status = TapeStatus(row["status"])
        if status not in LOADABLE and status != TapeStatus.IN_TRANSIT_TO_VTS:
            raise SenseError(SenseKey.NOT_READY, Asc.LUN_NOT_READY_MANUAL_INTERVENTION)
        if self.before_mount is not None:
            pending = self.before_mount(barcode)
            if pending is not None:
                pending.add_done_callback(lambda fut: self._fetched(barcode, fut))
                return None, status in READ_ONLY
        if self.drive_host is not None:  # the drive's worker opens it
            if not (self.tape_dir(barcode) / META_NAME).is_file():
                log.error("cannot open cartridge %s: no cartridge files", barcode)
                raise SenseError(SenseKey.MEDIUM_ERROR, Asc.MEDIUM_LOAD_OR_EJECT_FAILED)
            return CartridgeRef(barcode, self.tape_dir(barcode)), status in READ_ONLY
        try:
            cartridge = Cartridge.open(self.tape_dir(barcode))
        except (CartridgeError, OSError, ValueError) as exc:
            log.error("cannot open cartridge %s: %s", barcode, exc)
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.MEDIUM_LOAD_OR_EJECT_FAILED) from None
        return cartridge, status in READ_ONLY

    def _fetched(self, barcode: str, fut: Any) -> None:
        """A deferred mount's data is local (or the fetch gave up): load it into its drive."""
        if fut.cancelled() or fut.exception() is not None:
            log.error("tape %s stays not ready: its data could not be fetched (%s)", barcode,
                      "cancelled" if fut.cancelled() else fut.exception())
            return
        if self.changer is None:
            return
        try:
            if self.changer.complete_load(barcode):
                log.info("tape %s: data fetched back; the drive is ready", barcode)
        except SenseError as exc:
            log.error("tape %s cannot be loaded after its fetch: %s", barcode, exc)

    def unmount(self, barcode: str, cartridge: Any) -> None:
        """Close a cartridge a drive gave back and record how much of it is used."""
        if cartridge is None:
            return
        if isinstance(cartridge, CartridgeRef):
            if cartridge.used_bytes is None:
                return
            used = cartridge.used_bytes
        else:
            used = cartridge.used_bytes
            cartridge.close()
        q.update_tape(self.db, barcode, used_bytes=used, updated_at=self._now())

    def moved(self, medium: Medium, source: int, destination: int) -> None:
        """Persist one move (and its status effect) before MOVE MEDIUM completes."""
        ie = ElementType.IMPORT_EXPORT
        src_kind, dst_kind = self.layout.type_of(source), self.layout.type_of(destination)
        now = self._now()
        with q.transaction(self.db):
            row = q.get_tape(self.db, medium.barcode)
            if row is None:
                raise KeyError(medium.barcode)
            status = TapeStatus(row["status"])
            fields: dict[str, Any] = {"element_address": destination,
                                      "source_address": medium.source, "updated_at": now}
            if dst_kind == ie and src_kind != ie and status == TapeStatus.AVAILABLE:
                fields["status"] = check_transition(status, TapeStatus.IN_TRANSIT_TO_VTS).value
            elif src_kind == ie and dst_kind != ie and status == TapeStatus.IN_TRANSIT_TO_VTS:
                fields["status"] = check_transition(status, TapeStatus.AVAILABLE).value
            q.update_tape(self.db, medium.barcode, **fields)
            q.add_event(self.db, now, "tape.move", medium.barcode,
                        f"{self._describe_address(source)} -> {self._describe_address(destination)}"
                        + (f"; status {fields['status']}" if "status" in fields else ""))

    def _describe_address(self, address: int) -> str:
        loc = self.location(address)
        return f"{loc['type']} {loc['mtx']}"

    # --- appliance-side inventory changes -------------------------------------------------
    def take_for_archive(self, barcode: str) -> None:
        """For the archiving job: take an exported tape out of its I/E slot (-> ARCHIVING).

        Refused while an initiator holds PREVENT MEDIUM REMOVAL on the changer."""
        changer = self._need_changer()
        row = self._tape_row(barcode)
        check_transition(row["status"], TapeStatus.ARCHIVING)
        address = changer.locate(barcode)
        if address is None or self.layout.type_of(address) != ElementType.IMPORT_EXPORT:
            raise Conflict(f"tape {barcode} is not in an import/export slot")
        if changer.removal_prevented:
            raise Conflict("an initiator prevents medium removal from the library; try later")
        now = self._now()
        with q.transaction(self.db):
            q.update_tape(self.db, barcode, element_address=None,
                          status=TapeStatus.ARCHIVING.value, updated_at=now)
            q.add_event(self.db, now, "tape.archive", barcode, "left the library for archiving")
        changer.remove(address)

    def insert_tape(self, barcode: str) -> int:
        """Put a tape that is outside the library (e.g. RETRIEVED) into a free I/E slot."""
        changer = self._need_changer()
        row = self._tape_row(barcode)
        if row["element_address"] is not None:
            raise Conflict(f"tape {barcode} is already in the library")
        free = changer.free_addresses(ElementType.IMPORT_EXPORT)
        if not free:
            raise LimitExceeded("no free import/export slot; move tapes into storage slots")
        now = self._now()
        with q.transaction(self.db):
            q.update_tape(self.db, barcode, element_address=free[0], source_address=None,
                          updated_at=now)
            q.add_event(self.db, now, "tape.insert", barcode, f"into ie {self.layout.mtx_number(free[0])}")
        return changer.insert(Medium(barcode, worm=bool(row["worm"]), imported=True), free[0])

    # --- views ----------------------------------------------------------------------------
    def location(self, address: int | None, status: str | None = None) -> dict[str, Any]:
        if address is None:
            kind = "none" if status == TapeStatus.DELETED.value else "shelf"
            return {"type": kind, "address": None, "mtx": None}
        names = {ElementType.STORAGE: "slot", ElementType.IMPORT_EXPORT: "ie",
                 ElementType.DATA_TRANSFER: "drive"}
        kind = self.layout.type_of(address)
        return {"type": names.get(kind, "transport") if kind is not None else "unknown",
                "address": address, "mtx": self.layout.mtx_number(address)}

    def tape_json(self, row: dict[str, Any]) -> dict[str, Any]:
        address = row["element_address"]
        target = None
        if address is not None and self.layout.type_of(address) == ElementType.DATA_TRANSFER:
            target = self.drive_iqn(self.layout.drive_index(address))
        return {
            "barcode": row["barcode"],
            "status": row["status"],
            "size_bytes": row["size_bytes"],
            "used_bytes": row["used_bytes"] or 0,
            "pool": row["pool"],
            "worm": bool(row["worm"]),
            "location": self.location(address, row["status"]),
            "target_iqn": target,
            "created_at": row["created_at"],
        }

    def _tape_row(self, barcode: Any) -> dict[str, Any]:
        if not isinstance(barcode, str):
            raise InvalidRequest("barcode must be a string, e.g. VT0000001")
        code = barcodes.normalize(barcode)
        row = q.get_tape(self.db, code)
        if row is None or row["status"] == TapeStatus.DELETED.value:
            raise NotFound(f"no tape {code}; list tapes with `vtl tape list`")
        return row

    # --- control operations ---------------------------------------------------------------
    def ops(self) -> dict[str, Op]:
        return {
            "CreateTapes": self.create_tapes,
            "CreateTapeWithBarcode": self.create_tape_with_barcode,
            "ListTapes": self.list_tapes,
            "DescribeTape": self.describe_tape,
            "DeleteTape": self.delete_tape,
            "LibraryStatus": self.status,
            "SetChangerType": self.set_changer_type,
        }

    def _size(self, value: Any) -> int:
        lim = self.limits
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest("size_bytes must be a whole number of bytes, e.g. 107374182400")
        if value % GiB or not lim.min_tape_bytes <= value <= lim.max_tape_bytes:
            raise InvalidRequest(
                f"invalid tape size {value} bytes: use whole GiB from {lim.min_tape_bytes // GiB} "
                f"GiB to {lim.max_tape_bytes // TiB} TiB (e.g. --size 200GiB)")
        return value

    def _pool(self, value: Any) -> str:
        """A built-in pool (normalised) or a custom pool of the catalog (its stored name)."""
        pool = str(value or "glacier").strip().lower().replace("_", "-")
        if pool in POOLS:
            return pool
        custom = pq.get_pool(self.db, str(value).strip()) if value else None
        if custom is None:
            raise InvalidRequest(f"unknown pool {value!r}: use glacier, deep-archive or a pool "
                                 "from `vtl archive pool list`")
        return str(custom["name"])

    def create_tapes(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateTapes: ``prefix``, ``count`` (1-10), ``size_bytes``, ``pool``, ``worm``."""
        count = args.get("count")
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 1 <= count <= self.limits.max_per_call:
            raise InvalidRequest(f"count must be 1 to {self.limits.max_per_call} tapes per call")
        prefix = barcodes.validate_prefix(str(args.get("prefix") or ""))
        codes = barcodes.generate(prefix, count, q.used_barcodes(self.db, prefix))
        return {"tapes": self._create(codes, args)}

    def create_tape_with_barcode(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateTapeWithBarcode: ``barcode``, ``size_bytes``, ``pool``, ``worm``."""
        code = barcodes.validate_barcode(str(args.get("barcode") or ""))
        if q.barcode_used(self.db, code):
            raise Conflict(f"barcode {code} was used before and is never reused; pick another")
        return {"tape": self._create([code], args)[0]}

    def _create(self, codes: list[str], args: dict[str, Any]) -> list[dict[str, Any]]:
        changer = self._need_changer()
        size = self._size(args.get("size_bytes"))
        pool = self._pool(args.get("pool"))
        worm = bool(args.get("worm", False))
        in_lib = [s.value for s in IN_LIBRARY]
        n, total = q.count_and_size(self.db, in_lib)
        if n + len(codes) > self.limits.max_tapes:
            raise LimitExceeded(f"a library holds at most {self.limits.max_tapes} tapes "
                                f"({n} now); delete or archive tapes first")
        if total + size * len(codes) > self.limits.max_total_bytes:
            raise LimitExceeded("a library holds at most 1 PiB of tapes; delete or archive "
                                "tapes first")
        free = changer.free_addresses(ElementType.IMPORT_EXPORT)
        if len(free) < len(codes):
            raise LimitExceeded(f"only {len(free)} free import/export slots; move tapes into "
                                "storage slots first")
        now = self._now()
        with q.transaction(self.db):
            for code in codes:
                if q.barcode_used(self.db, code):
                    raise Conflict(f"barcode {code} was used before and is never reused")
                q.reserve_barcode(self.db, code, now)
                q.insert_tape(self.db, {
                    "barcode": code, "size_bytes": size, "used_bytes": 0,
                    "status": TapeStatus.CREATING.value, "pool": pool, "worm": int(worm),
                    "element_address": None, "source_address": None,
                    "created_at": now, "updated_at": now})
        created: list[str] = []
        try:
            for code in codes:
                Cartridge.create(self.tape_dir(code), code, size, worm=worm).close()
                created.append(code)
        except Exception as exc:
            log.exception("creating cartridge files failed")
            with q.transaction(self.db):
                for code in codes:
                    if code not in created:
                        q.update_tape(self.db, code, status=TapeStatus.IRRECOVERABLE.value,
                                      updated_at=now)
            if not created:
                raise ApplianceError(f"could not create tape files: {exc}",
                                     code="InternalError") from None
        placed = dict(zip(created, free))
        with q.transaction(self.db):
            for code, address in placed.items():
                check_transition(TapeStatus.CREATING, TapeStatus.AVAILABLE)
                q.update_tape(self.db, code, status=TapeStatus.AVAILABLE.value,
                              element_address=address, updated_at=now)
                q.add_event(self.db, now, "tape.create", code,
                            f"{size // GiB} GiB {pool}{' WORM' if worm else ''} in ie "
                            f"{self.layout.mtx_number(address)}")
        for code, address in placed.items():
            changer.insert(Medium(code, worm=worm, imported=True), address)
        return [self.tape_json(q.get_tape(self.db, code) or {}) for code in created]

    def list_tapes(self, args: dict[str, Any]) -> dict[str, Any]:
        """ListTapes: every tape but deleted ones, or those of ``status``."""
        status = args.get("status")
        if status is not None:
            try:
                status = TapeStatus(str(status).upper().replace("_", " ")).value
            except ValueError:
                raise InvalidRequest(f"unknown status {args['status']!r}; use one of "
                                     + ", ".join(s.value for s in TapeStatus)) from None
            rows = q.list_tapes(self.db, status)
        else:
            rows = q.list_tapes(self.db, exclude=[TapeStatus.DELETED.value])
        return {"tapes": [self.tape_json(r) for r in rows]}

    def describe_tape(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.tape_json(self._tape_row(args.get("barcode")))

    def delete_tape(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteTape: a tape not in a drive; its barcode stays reserved."""
        changer = self._need_changer()
        row = self._tape_row(args.get("barcode"))
        code = row["barcode"]
        address = row["element_address"]
        if address is not None and self.layout.type_of(address) == ElementType.DATA_TRANSFER:
            raise Conflict(f"tape {code} is in drive {self.layout.drive_index(address)}; "
                           "move it to a slot first (e.g. `mtx unload`)")
        check_transition(row["status"], TapeStatus.DELETING)
        final = TapeStatus.DELETING if self.defer_delete else TapeStatus.DELETED
        now = self._now()
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=final.value, element_address=None,
                          source_address=None, updated_at=now)
            q.add_event(self.db, now, "tape.delete", code, "deleted" if final is
                        TapeStatus.DELETED else "deleting (its objects are removed next)")
        if address is not None and changer.locate(code) == address:
            changer.remove(address)
        shutil.rmtree(self.tape_dir(code), ignore_errors=True)
        return self.tape_json(q.get_tape(self.db, code) or row)

    def status(self, args: dict[str, Any]) -> dict[str, Any]:
        """LibraryStatus: changer identity and target, drives, slot occupancy."""
        changer = self._need_changer()
        live = self.drive_host.status() if self.drive_host is not None else {}
        drives = []
        for i, drive in enumerate(self.drives):
            st = live.get(i)
            if self.drive_host is not None:
                counters = {"bytes_written": st["bytes_written"] if st else None,
                            "bytes_read": st["bytes_read"] if st else None,
                            "write_bytes_per_s": st["write_bytes_per_s"] if st else None,
                            "read_bytes_per_s": st["read_bytes_per_s"] if st else None,
                            "worker": st.get("worker") if st else None,
                            "worker_pid": st.get("pid") if st else None}
            else:
                counters = {"bytes_written": drive.bytes_written,
                            "bytes_read": drive.bytes_read,
                            "write_bytes_per_s": None, "read_bytes_per_s": None,
                            "worker": None, "worker_pid": None}
            drives.append({
                "index": i,
                "target_iqn": self.drive_iqn(i),
                "serial": drive_serial(self.gateway_id, i),
                "barcode": changer.contents.get(self.layout.drive_address(i)).barcode
                if self.layout.drive_address(i) in changer.contents else None,
                **counters,
            })
        return {
            "changer_type": changer.identity.type_name,
            "changer": {"target_iqn": self.changer_iqn, "vendor": changer.identity.vendor,
                        "product": changer.identity.product,
                        "revision": changer.identity.revision, "serial": changer.serial},
            "drives": drives,
            "slots": {"total": self.layout.storage,
                      "full": changer.occupancy(ElementType.STORAGE)},
            "ie": {"total": self.layout.import_export,
                   "full": changer.occupancy(ElementType.IMPORT_EXPORT)},
            "removal_prevented": changer.removal_prevented,
        }

    def set_changer_type(self, args: dict[str, Any]) -> dict[str, Any]:
        """SetChangerType: persisted; INQUIRY changes at once (UA 3F/03 INQUIRY DATA HAS
        CHANGED on every session)."""
        changer = self._need_changer()
        name = str(args.get("type") or "")
        if name not in CHANGER_TYPES:
            raise InvalidRequest(f"unknown changer type {name!r}; use one of "
                                 + ", ".join(CHANGER_TYPES))
        self.catalog.set_setting(CHANGER_TYPE_SETTING, name)
        if name != changer.identity.type_name:
            changer.set_identity(CHANGER_TYPES[name])
        return {"changer_type": name}
