"""A tiny scripted initiator for driving IscsiConnection byte for byte in tests."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from vtl.iscsi import pdu as P
from vtl.iscsi.connection import IscsiConnection
from vtl.iscsi.server import IscsiServer
from vtl.iscsi.target import IscsiTarget, TargetAuth, Targets
from vtl.iscsi.text import decode_text, encode_text

from tests.iscsi.fakedisk import FakeDisk

TARGET = "iqn.2026-11.org.vtl.test:disk"
INITIATOR = "iqn.2026-11.org.vtl.test:initiator"
ISID = 0x23D000000001
HANG_GUARD = 120  # seconds; only to turn a hang into a failure, never a timing assertion


def make_registry(auth: TargetAuth | None = None, disk: FakeDisk | None = None) -> Targets:
    reg = Targets()
    reg.add(IscsiTarget(TARGET, disk or FakeDisk(), auth=auth or TargetAuth(), alias="disk"))
    return reg


def counting_bytes(n: int) -> bytes:
    """Deterministic 'random' bytes for CHAP challenges."""
    return bytes(range(1, n + 1))


@dataclass
class Initiator:
    """Sends PDUs into a connection and decodes what comes back."""

    conn: IscsiConnection
    now: float = 0.0
    cmdsn: int = 100
    itt: int = 1
    header_digest: bool = False
    data_digest: bool = False
    received: list[P.Pdu] = field(default_factory=list)
    _reader: P.PduReader = field(default_factory=lambda: P.PduReader(1 << 24))

    def send_raw(self, data: bytes) -> list[P.Pdu]:
        self.conn.receive_data(data, self.now)
        return self.collect()

    def send(self, pdu: P.Pdu) -> list[P.Pdu]:
        raw = b"".join(bytes(b) for b in P.encode_pdu(
            pdu, header_digest=self.header_digest, data_digest=self.data_digest))
        return self.send_raw(raw)

    def collect(self) -> list[P.Pdu]:
        for buf in self.conn.data_to_send():
            self._reader.feed(buf)
        out: list[P.Pdu] = []
        while (p := self._reader.next_pdu()) is not None:
            out.append(p)
        self.received += out
        return out

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def login(self, keys: list[tuple[str, str]] | None = None, *, csg: int = 1, nsg: int = 3,
              transit: bool = True) -> P.LoginResponse:
        pairs = keys if keys is not None else [
            ("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
        out = self.send(P.LoginRequest(transit=transit, csg=csg, nsg=nsg, isid=ISID,
                                       itt=self.itt, cmdsn=self.cmdsn, expstatsn=0,
                                       data=encode_text(pairs)))
        assert len(out) == 1 and isinstance(out[0], P.LoginResponse), out
        rsp = out[0]
        if rsp.transit and rsp.nsg == 3 and rsp.status == 0:
            d = dict(decode_text(rsp.data))
            self.header_digest = d.get("HeaderDigest") == "CRC32C"
            self.data_digest = d.get("DataDigest") == "CRC32C"
        return rsp

    def command(self, cdb: bytes, *, read: int = 0, write: bytes | None = None, edtl: int | None = None,
                immediate_len: int | None = None, final: bool = True, lun: int = 0) -> int:
        """Send a SCSI command; returns its ITT. Does not send Data-Out."""
        itt = self.next_itt()
        data = b""
        if write is not None and immediate_len:
            data = write[:immediate_len]
        length = edtl if edtl is not None else (read or (len(write) if write else 0))
        self.send(P.ScsiCommandPdu(final=final, read=bool(read), write=write is not None,
                                   attr=1, lun=bytes([0, lun]) + bytes(6), itt=itt, edtl=length,
                                   cmdsn=self.cmdsn, expstatsn=0, cdb=cdb.ljust(16, b"\0"),
                                   data=data))
        self.cmdsn += 1
        return itt


class ServerThread:
    """Runs IscsiServer in its own event loop thread."""

    def __init__(self, registry: Targets) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = IscsiServer(registry, "127.0.0.1", 0, nop_interval=5.0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(HANG_GUARD)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(HANG_GUARD)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG_GUARD)
        self.loop.close()

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.server.port}"
