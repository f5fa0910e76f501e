"""``vtl selftest``: drive the running library from the outside, as a backup host would.

Over the project's own iSCSI initiator (:mod:`vtl.iscsi.initiator`) and pyscsi's command
classes: INQUIRY and READ ELEMENT STATUS on the changer, MOVE MEDIUM of a blank tape into an
empty drive, WRITE(6) of pseudo-random blocks, WRITE FILEMARKS, REWIND, READ(6) back compared
bit for bit, the FILEMARK sense after the last block, ERASE back to blank, LOAD UNLOAD and
MOVE MEDIUM home again; finally the catalog (DescribeTape) must say the tape is blank and home.

Invariants:
- No output of its own: progress goes through a callback, the outcome is a :class:`Outcome`.
  The control API is a callable ``control(op, **args)`` handed in by the caller (the CLI), so
  this module does not depend on ``cli``.
- The tape is always put back: after any failure past the load, the tape is erased (it was
  blank), unloaded and moved home, best effort, and the verdict says where it is.
- "Home" is the storage slot the tape came from. A blank tape found only in an import/export
  slot is first moved into a free storage slot (as a backup application imports it); putting it
  back into the I/E slot would export it for archiving (AVAILABLE -> IN TRANSIT TO VTS).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from pyscsi.pyscsi.scsi import SCSI

from vtl.iscsi.errors import IscsiError
from vtl.iscsi.initiator import (
    CheckCondition,
    Initiator,
    PyscsiDevice,
    Reply,
    ScsiStatusError,
    fixed_sense,
    open_session,
)

Control = Callable[..., Any]
Progress = Callable[["Step"], None]

TRANSPORT, STORAGE, IMPORT_EXPORT, DATA_TRANSFER = 1, 2, 3, 4
PERIPHERAL_CHANGER, PERIPHERAL_TAPE = 0x08, 0x01
NO_SENSE, NOT_READY, UNIT_ATTENTION, BLANK_CHECK = 0x0, 0x2, 0x6, 0x8
ELEMENT_STATUS_ALLOC = 1 << 20
READY_TIMEOUT = 30.0
MB = 1_000_000
STEP_NAMES = (
    "control API",
    "changer INQUIRY",
    "inventory",
    "choose tape and drive",
    "import to storage",
    "load tape",
    "drive ready",
    "write",
    "write filemark",
    "rewind",
    "read back",
    "filemark check",
    "erase",
    "unload",
    "return tape",
    "verify blank",
)
CREATE_HINT = "create one with `vtl tape create --prefix ST --count 1 --size 100GiB`"


class SelftestFailure(Exception):
    """A check that did not hold; the message is one line saying what and what to do."""


@dataclass
class Step:
    """One step's outcome, reported through the progress callback as it ends."""

    index: int
    total: int
    name: str
    status: str = "ok"  # ok | failed | skipped
    elapsed: float = 0.0
    detail: str = ""


@dataclass
class Outcome:
    passed: bool
    verdict: str
    reason: str = ""
    failed_step: str = ""
    checks: int = 0
    write_mb_s: float = 0.0
    read_mb_s: float = 0.0
    tape: str | None = None
    drive: int | None = None
    steps: list[Step] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Element:
    address: int
    kind: int
    full: bool
    barcode: str | None


def _cc_text(err: CheckCondition) -> str:
    return f"CHECK CONDITION {err.sense_key:x}/{err.asc:02x}/{err.ascq:02x}"


def _reply_text(reply: Reply) -> str:
    if reply.status == 0x02:
        key, asc, ascq = fixed_sense(reply.sense)
        return f"CHECK CONDITION {key:x}/{asc:02x}/{ascq:02x}"
    return f"status 0x{reply.status:02x}"


def parse_elements(result: dict[str, Any]) -> list[Element]:
    """pyscsi's READ ELEMENT STATUS result -> elements (barcode from the primary volume tag)."""
    out: list[Element] = []
    for page in result.get("element_status_pages", []):
        for desc in page.get("element_descriptors", []):
            tag = desc.get("primary_volume_tag")
            code = bytes(tag[:32]).decode("ascii", "replace").strip(" \0") if tag else ""
            full = bool(desc.get("full"))
            out.append(Element(desc["element_address"], page["element_type"], full,
                               code if full and code else None))
    return out


class Selftest:
    """One run. ``run()`` returns the :class:`Outcome`; it never raises for a failed check."""

    def __init__(self, control: Control, *, host: str | None = None, port: int | None = None,
                 blocks: int = 64, block_size: int = 64 * 1024, timeout: float = 30.0,
                 progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 seed: int | None = None) -> None:
        if blocks < 1:
            raise ValueError("blocks must be at least 1")
        if not 1 <= block_size <= 0xFFFFFF:
            raise ValueError("block size must be 1 byte to 16 MiB - 1")
        self.control = control
        self.host, self.port = host, port
        self.blocks, self.block_size = blocks, block_size
        self.timeout = timeout
        self.progress = progress
        self.clock, self.sleep = clock, sleep
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self.checks = 0
        self.steps: list[Step] = []
        # state, for the steps and the cleanup
        self.library: dict[str, Any] = {}
        self.changer_iqn = ""
        self.changer: Initiator | None = None
        self.changer_scsi: SCSI | None = None
        self.elements: list[Element] = []
        self.tapes: list[dict[str, Any]] = []
        self.tape: str | None = None
        self.source: int | None = None  # where the tape was found
        self.home: int | None = None  # where it goes back (a storage slot)
        self.drive_index: int | None = None
        self.drive_address: int | None = None
        self.drive: Initiator | None = None
        self.in_drive = False
        self.written = False
        self.write_mb_s = self.read_mb_s = 0.0

    # --- driver -----------------------------------------------------------------------------
    def run(self) -> Outcome:
        actions: list[Callable[[], str]] = [
            self._layout, self._changer_inquiry, self._inventory, self._choose, self._import,
            self._load, self._drive_ready, self._write, self._write_filemark, self._rewind,
            self._read_back, self._filemark_check, self._erase, self._unload, self._return,
            self._verify,
        ]
        total = len(actions)
        failure: tuple[Step, str] | None = None
        for i, (name, action) in enumerate(zip(STEP_NAMES, actions), start=1):
            step = Step(i, total, name)
            start = self.clock()
            try:
                detail = action()
                if detail.startswith("skipped"):
                    step.status = "skipped"
                step.detail = detail
            except Exception as exc:  # every failure ends the run with a one-line reason
                step.status = "failed"
                step.detail = self._describe(exc)
                failure = (step, step.detail)
            step.elapsed = self.clock() - start
            self.steps.append(step)
            if self.progress is not None:
                self.progress(step)
            if failure is not None:
                break
        if failure is not None:
            where = self._cleanup()
            step, reason = failure
            if where:
                reason = f"{reason} ({where})"
            self._close()
            return Outcome(False, f"selftest FAILED at {step.name}: {reason}", reason, step.name,
                           self.checks, self.write_mb_s, self.read_mb_s, self.tape,
                           self.drive_index, self.steps)
        self._close()
        verdict = (f"selftest PASSED ({self.checks} checks, {self.write_mb_s:.1f} MB/s write, "
                   f"{self.read_mb_s:.1f} MB/s read)")
        return Outcome(True, verdict, "", "", self.checks, self.write_mb_s, self.read_mb_s,
                       self.tape, self.drive_index, self.steps)

    @staticmethod
    def _describe(exc: BaseException) -> str:
        if isinstance(exc, SelftestFailure):
            return str(exc)
        if isinstance(exc, CheckCondition):
            return _cc_text(exc)
        if isinstance(exc, (IscsiError, ScsiStatusError, OSError)):
            return f"iSCSI: {exc}"
        text = " ".join(str(exc).split())
        if type(exc).__name__ == "ClickException":  # the control API client's one-liners
            return text
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise SelftestFailure(message)
        self.checks += 1

    # --- helpers ----------------------------------------------------------------------------
    def _pyscsi(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a pyscsi call; a pending UNIT ATTENTION is consumed and the call retried."""
        for _ in range(8):
            try:
                return fn()
            except CheckCondition as err:
                if err.sense_key == UNIT_ATTENTION:
                    continue
                raise SelftestFailure(f"{what}: {_cc_text(err)}") from None
        raise SelftestFailure(f"{what}: UNIT ATTENTION does not clear")

    def _drive_cmd(self, what: str, cdb: bytes, data_out: bytes = b"",
                   expect_in: int = 0) -> Reply:
        assert self.drive is not None
        return self.drive.execute(0, cdb, data_out, expect_in)

    def _expect_good(self, what: str, reply: Reply) -> None:
        self._check(reply.status == 0, f"{what} answered {_reply_text(reply)}")

    def _wait_ready(self, ini: Initiator, what: str) -> int:
        """TEST UNIT READY until GOOD; UNIT ATTENTIONs are consumed. Returns how many."""
        deadline = self.clock() + READY_TIMEOUT
        attentions = 0
        while True:
            reply = ini.execute(0, bytes(6))
            if reply.status == 0:
                return attentions
            key = fixed_sense(reply.sense)[0] if reply.status == 0x02 else -1
            if key == UNIT_ATTENTION:
                attentions += 1
                if attentions > 16:
                    raise SelftestFailure(f"{what}: UNIT ATTENTION does not clear")
                continue
            if key != NOT_READY or self.clock() > deadline:
                raise SelftestFailure(f"{what} not ready: {_reply_text(reply)}")
            self.sleep(0.2)

    def _block(self, rng: random.Random) -> bytes:
        return rng.randbytes(self.block_size)

    # --- steps ------------------------------------------------------------------------------
    def _layout(self) -> str:
        if self.port is None or self.host is None:
            info = self.control("DescribeGatewayInformation") or {}
            if self.port is None:
                port = info.get("iscsi_port")
                if not port:
                    raise SelftestFailure("the appliance serves no iSCSI portal; check its log")
                self.port = int(port)
            if self.host is None:
                host = info.get("iscsi_host") or "127.0.0.1"
                self.host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.library = self.control("LibraryStatus") or {}
        changer = self.library.get("changer") or {}
        self.changer_iqn = changer.get("target_iqn") or ""
        self._check(bool(self.changer_iqn) and bool(self.library.get("drives")),
                    "the appliance reports no tape library; is the library service running?")
        self.tapes = (self.control("ListTapes") or {}).get("tapes", [])
        return (f"portal {self.host}:{self.port}, {len(self.library['drives'])} drives, "
                f"{len(self.tapes)} tapes")

    def _changer_inquiry(self) -> str:
        assert self.host is not None and self.port is not None
        self.changer = open_session(self.host, self.port, self.changer_iqn, timeout=self.timeout)
        dev = PyscsiDevice(self.changer)
        self.changer_scsi = SCSI(dev)  # sends INQUIRY and picks the opcode table
        self._check(dev.devicetype == PERIPHERAL_CHANGER,
                    f"{self.changer_iqn} is device type {dev.devicetype}, not a medium changer")
        inq = self.changer_scsi.inquiry().result
        self._wait_ready(self.changer, "the changer")
        vendor = bytes(inq.get("t10_vendor_identification", b"")).decode("ascii", "replace")
        product = bytes(inq.get("product_identification", b"")).decode("ascii", "replace")
        return f"{vendor.strip()} {product.strip()}".strip()

    def _inventory(self) -> str:
        scsi = self.changer_scsi
        assert scsi is not None
        cmd = self._pyscsi(lambda: scsi.readelementstatus(
            0, 0xFFFF, element_type=0, voltag=1, curdata=1, alloclen=ELEMENT_STATUS_ALLOC),
            "READ ELEMENT STATUS")
        self.elements = parse_elements(cmd.result)
        kinds = {k: [e for e in self.elements if e.kind == k]
                 for k in (TRANSPORT, STORAGE, IMPORT_EXPORT, DATA_TRANSFER)}
        self._check(len(kinds[DATA_TRANSFER]) == len(self.library["drives"]),
                    f"READ ELEMENT STATUS shows {len(kinds[DATA_TRANSFER])} drives, the "
                    f"appliance {len(self.library['drives'])}")
        seen = {e.barcode: e.address for e in self.elements if e.barcode}
        for tape in self.tapes:
            loc = tape.get("location") or {}
            if loc.get("address") is None:
                continue
            self._check(seen.get(tape["barcode"]) == loc["address"],
                        f"tape {tape['barcode']} is at element 0x{loc['address']:04x} in the "
                        f"catalog but at {seen.get(tape['barcode'])} in READ ELEMENT STATUS")
        full = sum(1 for e in self.elements if e.full)
        return (f"{len(kinds[STORAGE])} slots, {len(kinds[IMPORT_EXPORT])} I/E, "
                f"{len(kinds[DATA_TRANSFER])} drives, {full} tapes")

    def _choose(self) -> str:
        by_code = {e.barcode: e for e in self.elements if e.barcode}
        blank = [t for t in self.tapes
                 if t.get("status") == "AVAILABLE" and not t.get("used_bytes")
                 and not t.get("worm") and t["barcode"] in by_code
                 and by_code[t["barcode"]].kind in (STORAGE, IMPORT_EXPORT)]
        if not blank:
            raise SelftestFailure(f"no blank AVAILABLE tape in the library's slots; {CREATE_HINT}")
        blank.sort(key=lambda t: (by_code[t["barcode"]].kind != STORAGE,
                                  by_code[t["barcode"]].address))
        drives = sorted((e for e in self.elements if e.kind == DATA_TRANSFER),
                        key=lambda e: e.address)
        empty = [i for i, e in enumerate(drives) if not e.full]
        if not empty:
            raise SelftestFailure("every tape drive holds a tape; move one back to a slot "
                                  "(e.g. `mtx unload`) and run the selftest again")
        chosen = blank[0]
        self.tape = chosen["barcode"]
        self.source = by_code[chosen["barcode"]].address
        self.drive_index = empty[0]
        self.drive_address = drives[empty[0]].address
        self.checks += 1
        return (f"tape {self.tape} at element 0x{self.source:04x}, drive {self.drive_index} "
                f"(0x{self.drive_address:04x})")

    def _move(self, source: int, destination: int, what: str) -> None:
        scsi = self.changer_scsi
        assert scsi is not None
        self._pyscsi(lambda: scsi.movemedium(0, source, destination), what)
        self.checks += 1

    def _import(self) -> str:
        assert self.source is not None
        kind = next(e.kind for e in self.elements if e.address == self.source)
        if kind == STORAGE:
            self.home = self.source
            return "skipped: the tape is in a storage slot"
        free = sorted(e.address for e in self.elements if e.kind == STORAGE and not e.full)
        if not free:
            raise SelftestFailure("the tape is in an import/export slot and no storage slot is "
                                  "free to import it into; free a slot first")
        self._move(self.source, free[0], "MOVE MEDIUM (import)")
        self.home = free[0]
        return f"{self.tape} -> storage element 0x{free[0]:04x}"

    def _load(self) -> str:
        assert self.home is not None and self.drive_address is not None
        self._move(self.home, self.drive_address, "MOVE MEDIUM (load)")
        self.in_drive = True
        return f"{self.tape} -> drive {self.drive_index}"

    def _drive_ready(self) -> str:
        assert self.host is not None and self.port is not None and self.drive_index is not None
        iqn = self.library["drives"][self.drive_index]["target_iqn"]
        self.drive = open_session(self.host, self.port, iqn, timeout=self.timeout)
        dev = PyscsiDevice(self.drive)
        SCSI(dev)
        self._check(dev.devicetype == PERIPHERAL_TAPE,
                    f"{iqn} is device type {dev.devicetype}, not a tape drive")
        attentions = self._wait_ready(self.drive, f"drive {self.drive_index}")
        limits = self._drive_cmd("READ BLOCK LIMITS", bytes([0x05, 0, 0, 0, 0, 0]), expect_in=6)
        self._expect_good("READ BLOCK LIMITS", limits)
        max_block = int.from_bytes(limits.data_in[1:4], "big") if len(limits.data_in) >= 4 else 0
        self._check(not max_block or self.block_size <= max_block,
                    f"block size {self.block_size} exceeds the drive's maximum {max_block}; "
                    "use a smaller --block-size")
        return f"{iqn}; {attentions} unit attention(s) consumed; max block {max_block}"

    def _rw6(self, opcode: int, length: int) -> bytes:
        return bytes([opcode, 0]) + length.to_bytes(3, "big") + b"\0"

    def _write(self) -> str:
        rng = random.Random(self.seed)
        start = self.clock()
        self.written = True
        for i in range(self.blocks):
            reply = self._drive_cmd("WRITE(6)", self._rw6(0x0A, self.block_size),
                                    data_out=self._block(rng))
            if reply.status != 0:
                raise SelftestFailure(f"WRITE(6) of block {i} answered {_reply_text(reply)}")
        elapsed = max(self.clock() - start, 1e-9)
        self.checks += 1
        total = self.blocks * self.block_size
        self.write_mb_s = total / elapsed / MB
        return f"{self.blocks} x {self.block_size} B, {self.write_mb_s:.1f} MB/s"

    def _write_filemark(self) -> str:
        self._expect_good("WRITE FILEMARKS", self._drive_cmd(
            "WRITE FILEMARKS", bytes([0x10, 0, 0, 0, 1, 0])))
        return "1 filemark"

    def _rewind(self) -> str:
        self._expect_good("REWIND", self._drive_cmd("REWIND", bytes([0x01, 0, 0, 0, 0, 0])))
        return "at BOT"

    def _read_back(self) -> str:
        rng = random.Random(self.seed)
        start = self.clock()
        for i in range(self.blocks):
            reply = self._drive_cmd("READ(6)", self._rw6(0x08, self.block_size),
                                    expect_in=self.block_size)
            if reply.status != 0:
                raise SelftestFailure(f"READ(6) of block {i} answered {_reply_text(reply)}")
            want = self._block(rng)
            if reply.data_in != want:
                got = reply.data_in
                at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b),
                          min(len(got), len(want)))
                raise SelftestFailure(f"block {i} read back differs at byte {at} "
                                      f"({len(got)} bytes read, {len(want)} written)")
            self.checks += 1
        elapsed = max(self.clock() - start, 1e-9)
        self.read_mb_s = self.blocks * self.block_size / elapsed / MB
        return f"{self.blocks} blocks identical, {self.read_mb_s:.1f} MB/s"

    def _filemark_check(self) -> str:
        reply = self._drive_cmd("READ(6)", self._rw6(0x08, self.block_size),
                                expect_in=self.block_size)
        key, asc, ascq = fixed_sense(reply.sense)
        filemark = len(reply.sense) > 2 and bool(reply.sense[2] & 0x80)
        self._check(reply.status == 0x02 and key == NO_SENSE and (asc, ascq) == (0, 1)
                    and filemark, f"READ(6) past the last block answered {_reply_text(reply)}, "
                    "expected FILEMARK DETECTED (NO SENSE 00/01, FILEMARK=1)")
        return "FILEMARK DETECTED"

    def _erase_to_blank(self) -> None:
        self._expect_good("REWIND", self._drive_cmd("REWIND", bytes([0x01, 0, 0, 0, 0, 0])))
        self._expect_good("ERASE", self._drive_cmd("ERASE", bytes([0x19, 0, 0, 0, 0, 0])))
        self.written = False

    def _erase(self) -> str:
        self._erase_to_blank()
        reply = self._drive_cmd("READ(6)", self._rw6(0x08, self.block_size),
                                expect_in=self.block_size)
        key, asc, ascq = fixed_sense(reply.sense)
        self._check(reply.status == 0x02 and key == BLANK_CHECK and (asc, ascq) == (0, 5),
                    f"READ(6) after ERASE at BOT answered {_reply_text(reply)}, expected "
                    "END-OF-DATA (BLANK CHECK 00/05)")
        return "END-OF-DATA at BOT"

    def _unload(self) -> str:
        self._expect_good("LOAD UNLOAD", self._drive_cmd("LOAD UNLOAD", bytes([0x1B, 0, 0, 0, 0,
                                                                               0])))
        assert self.drive is not None
        self.drive.close()
        self.drive = None
        return "unloaded"

    def _return(self) -> str:
        assert self.home is not None and self.drive_address is not None
        self._move(self.drive_address, self.home, "MOVE MEDIUM (return)")
        self.in_drive = False
        return f"{self.tape} -> element 0x{self.home:04x}"

    def _verify(self) -> str:
        tape = self.control("DescribeTape", barcode=self.tape) or {}
        loc = tape.get("location") or {}
        self._check(loc.get("address") == self.home,
                    f"tape {self.tape} is at {loc}, expected element 0x{self.home:04x}")
        self._check(tape.get("status") == "AVAILABLE",
                    f"tape {self.tape} is {tape.get('status')}, expected AVAILABLE")
        self._check(tape.get("used_bytes") == 0,
                    f"tape {self.tape} still uses {tape.get('used_bytes')} bytes after ERASE")
        return f"{self.tape} AVAILABLE, 0 bytes used, {loc.get('type')} {loc.get('mtx')}"

    # --- after a failure --------------------------------------------------------------------
    def _cleanup(self) -> str:
        """Best effort: erase what we wrote, unload, move the tape home. Says where it is."""
        if self.tape is None or self.home is None:
            return ""
        notes: list[str] = []
        if self.in_drive:
            if self.drive is not None and self.drive.connected:
                try:
                    if self.written:
                        self._erase_to_blank()
                        notes.append("erased")
                    self.drive.execute(0, bytes([0x1B, 0, 0, 0, 0, 0]))
                except Exception:
                    pass
                self.drive.close()
                self.drive = None
            try:
                if self.changer is None or not self.changer.connected:
                    assert self.host is not None and self.port is not None
                    self.changer = open_session(self.host, self.port, self.changer_iqn,
                                                timeout=self.timeout)
                    self.changer_scsi = SCSI(PyscsiDevice(self.changer))
                self._move(self.drive_address or 0, self.home, "MOVE MEDIUM (return)")
                self.in_drive = False
            except Exception as exc:
                return (f"tape {self.tape} is still in drive {self.drive_index}: "
                        f"{self._describe(exc)}; move it back with mtx")
        notes.append(f"back in {self._where()}")
        return f"tape {self.tape} " + ", ".join(notes)

    def _where(self) -> str:
        """The tape's location as the catalog names it (``slot 1``), else its element."""
        try:
            loc = (self.control("DescribeTape", barcode=self.tape) or {}).get("location") or {}
            if loc.get("mtx") is not None:
                return f"{loc.get('type')} {loc.get('mtx')}"
        except Exception:
            pass
        return f"element 0x{self.home or 0:04x}"

    def _close(self) -> None:
        for ini in (self.drive, self.changer):
            if ini is not None:
                try:
                    ini.close()
                except Exception:
                    pass
        self.drive = self.changer = None


def run_selftest(control: Control, **kwargs: Any) -> Outcome:
    """Run a selftest against the appliance behind ``control``; see :class:`Selftest`."""
    return Selftest(control, **kwargs).run()


__all__ = ["Outcome", "Selftest", "SelftestFailure", "Step", "STEP_NAMES", "run_selftest"]
