"""NFS v4.1 server state (RFC 8881 sections 2.10, 8, 9, 18.35-18.36, 18.46): client records,
sessions with their slot tables and reply caches, and open stateids with share reservations.

Pure code: no sockets, threads or clocks. Time is passed in as ``now`` (seconds, monotonic).
The caller serialises calls (one lock around the table); nothing here blocks.

Invariants:
- State lives in memory only. Client ids, session ids and stateid ``other`` fields start with
  this server instance's 4-byte ``boot`` tag, so ids from before a restart are recognised as
  stale (STALE_CLIENTID, BADSESSION, STALE_STATEID) instead of being confused with new ones.
- A slot's ``seqid`` only moves forward when a SEQUENCE is accepted as a new request; a retry
  of the last request on a slot gets the cached reply, or RETRY_UNCACHED_REP when none was
  kept; anything else is SEQ_MISORDERED. A slot busy with a request answers DELAY.
- Every open stateid belongs to exactly one (client, open-owner, file); a second OPEN by the
  same owner of the same file upgrades it (seqid + 1). Share reservations of other owners are
  checked before any change (SHARE_DENIED).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fileshare.nfs4types import (
    NFS4_UINT32_MAX,
    ChannelAttrs,
    Stat,
    StateId,
)

MAX_SLOTS = 64
MAX_OPS = 64


class StateError(Exception):
    """A state operation failed with an nfsstat4."""

    def __init__(self, stat: Stat, message: str = "") -> None:
        super().__init__(message or stat.name)
        self.stat = stat


@dataclass
class Slot:
    seqid: int = 0
    reply: bytes | None = None
    busy: bool = False


@dataclass
class OpenState:
    other: bytes
    seqid: int
    client: Client
    owner: bytes
    fh: bytes
    access: int
    deny: int

    locks: list[LockState] = field(default_factory=list)

    def stateid(self) -> StateId:
        return StateId(self.seqid, self.other)


@dataclass
class LockState:
    """One lock owner's byte-range locks on one file, under one open (RFC 8881 9.4)."""

    other: bytes
    seqid: int
    client: Client
    owner: bytes
    open: OpenState
    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, type)

    @property
    def fh(self) -> bytes:
        return self.open.fh

    @property
    def access(self) -> int:
        return self.open.access

    def stateid(self) -> StateId:
        return StateId(self.seqid, self.other)


@dataclass(frozen=True, slots=True)
class LockDenied:
    """LOCK4denied: the range, type and owner of a conflicting lock."""

    start: int
    end: int
    type: int
    clientid: int
    owner: bytes


class LockConflict(Exception):
    def __init__(self, denied: LockDenied) -> None:
        super().__init__("lock conflict")
        self.denied = denied


READ_LT, WRITE_LT, READW_LT, WRITEW_LT = 1, 2, 3, 4
RANGE_END = 1 << 64


def _is_write(locktype: int) -> bool:
    return locktype in (WRITE_LT, WRITEW_LT)


def _subtract(ranges: list[tuple[int, int, int]], start: int, end: int
              ) -> list[tuple[int, int, int]]:
    out = []
    for s, e, t in ranges:
        if e <= start or s >= end:
            out.append((s, e, t))
            continue
        if s < start:
            out.append((s, start, t))
        if e > end:
            out.append((end, e, t))
    return out


@dataclass
class Session:
    sessionid: bytes
    client: Client
    fore: ChannelAttrs
    back: ChannelAttrs
    flags: int
    slots: list[Slot]


@dataclass(eq=False)
class Client:
    clientid: int
    owner: bytes
    verifier: bytes
    principal: tuple[object, ...]
    confirmed: bool
    last_renew: float
    cs_seq: int = 1  # the CREATE_SESSION sequence id expected next
    cs_reply: tuple[int, bytes] | None = None  # the last CREATE_SESSION result, for replays
    sessions: dict[bytes, Session] = field(default_factory=dict)
    opens: dict[bytes, OpenState] = field(default_factory=dict)
    reclaim_complete: bool = False


class StateTable:
    """All clients, sessions and open state of one server instance."""

    def __init__(self, boot: bytes, lease_time: int) -> None:
        if len(boot) != 4:
            raise ValueError("boot tag must be 4 bytes")
        self.boot = boot
        self.lease_time = lease_time
        self._counter = 0
        self.clients: dict[int, Client] = {}
        self.sessions: dict[bytes, Session] = {}
        self.stateids: dict[bytes, OpenState | LockState] = {}
        self.by_file: dict[bytes, list[OpenState]] = {}

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    # -------------------------------------------------------------------- clients

    def _expired(self, c: Client, now: float) -> bool:
        return now - c.last_renew > self.lease_time

    def _purge_client(self, c: Client) -> None:
        for sid in list(c.sessions):
            self.sessions.pop(sid, None)
        c.sessions.clear()
        for st in list(c.opens.values()):
            self._drop_open(st)
        self.clients.pop(c.clientid, None)

    def _new_client(self, owner: bytes, verifier: bytes, principal: tuple[object, ...],
                    now: float) -> Client:
        cid = struct.unpack(">Q", self.boot + struct.pack(">I", self._next()))[0]
        c = Client(cid, owner, verifier, principal, False, now)
        self.clients[cid] = c
        return c

    def exchange_id(self, owner: bytes, verifier: bytes, principal: tuple[object, ...],
                    update: bool, now: float) -> Client:
        """RFC 8881 18.35.5: the record for ``owner`` (maybe new, maybe unconfirmed)."""
        # Long-expired clients without sessions in use are dropped here (lazy lease expiry).
        for c in list(self.clients.values()):
            if self._expired(c, now) and now - c.last_renew > 4 * self.lease_time:
                self._purge_client(c)
        same = [c for c in self.clients.values() if c.owner == owner]
        confirmed = next((c for c in same if c.confirmed), None)
        unconfirmed = [c for c in same if not c.confirmed]
        if update:
            if confirmed is None:
                raise StateError(Stat.NOENT, "no confirmed record to update")
            if confirmed.principal != principal:
                raise StateError(Stat.PERM, "update by another principal")
            if confirmed.verifier != verifier:
                raise StateError(Stat.NOT_SAME, "update with another verifier")
            confirmed.last_renew = now
            return confirmed
        if confirmed is not None:
            if confirmed.principal != principal:
                if (confirmed.opens or confirmed.sessions) and not self._expired(confirmed, now):
                    raise StateError(Stat.CLID_INUSE, "owner in use by another principal")
                self._purge_client(confirmed)
            elif confirmed.verifier == verifier:
                for c in unconfirmed:
                    self._purge_client(c)
                return confirmed
            # else: client restart; the old record goes when the new one is confirmed
        for c in unconfirmed:
            self._purge_client(c)
        return self._new_client(owner, verifier, principal, now)

    def client(self, clientid: int) -> Client:
        c = self.clients.get(clientid)
        if c is None:
            raise StateError(Stat.STALE_CLIENTID, f"client {clientid:#x} unknown")
        return c

    def create_session_check(self, clientid: int, seq: int, principal: tuple[object, ...],
                             now: float) -> tuple[Client, tuple[int, bytes] | None]:
        """(client, cached reply to replay or None for a new request)."""
        c = self.client(clientid)
        if not c.confirmed and self._expired(c, now):
            # an unconfirmed record not confirmed within a lease is gone (RFC 8881 18.35.4)
            self._purge_client(c)
            raise StateError(Stat.STALE_CLIENTID, "unconfirmed client record expired")
        if not c.confirmed and c.principal != principal:
            raise StateError(Stat.CLID_INUSE, "CREATE_SESSION by another principal")
        if seq == c.cs_seq:
            return c, None
        if seq == (c.cs_seq - 1) & NFS4_UINT32_MAX and c.cs_reply is not None:
            return c, c.cs_reply
        raise StateError(Stat.SEQ_MISORDERED, f"csa_sequence {seq}, expected {c.cs_seq}")

    def create_session(self, c: Client, fore: ChannelAttrs, back: ChannelAttrs, flags: int,
                       now: float) -> Session:
        if not c.confirmed:
            c.confirmed = True
            for other in list(self.clients.values()):
                if other is not c and other.owner == c.owner:
                    self._purge_client(other)
        sid = struct.pack(">Q", c.clientid) + self.boot + struct.pack(">I", self._next())
        s = Session(sid, c, fore, back, flags, [Slot() for _ in range(fore.maxrequests)])
        self.sessions[sid] = s
        c.sessions[sid] = s
        c.last_renew = now
        return s

    def create_session_done(self, c: Client, status: int, body: bytes) -> None:
        c.cs_reply = (status, body)
        c.cs_seq = (c.cs_seq + 1) & NFS4_UINT32_MAX

    def destroy_session(self, sessionid: bytes) -> None:
        s = self.sessions.pop(sessionid, None)
        if s is None:
            raise StateError(Stat.BADSESSION)
        s.client.sessions.pop(sessionid, None)

    def destroy_clientid(self, clientid: int) -> None:
        c = self.client(clientid)
        if c.sessions or c.opens:
            raise StateError(Stat.CLIENTID_BUSY)
        self._purge_client(c)

    # -------------------------------------------------------------------- sessions

    def sequence(self, sessionid: bytes, seqid: int, slotid: int, now: float,
                 checks: tuple[int, int] = (0, 0)) -> tuple[Session, Slot, bytes | None]:
        """Accept a SEQUENCE. Returns (session, slot, cached reply for a retry or None).

        ``checks`` = (request size, operation count) checked against the session's fore
        channel before the slot is used (REQ_TOO_BIG, TOO_MANY_OPS).
        """
        s = self.sessions.get(sessionid)
        if s is None:
            raise StateError(Stat.BADSESSION)
        if slotid >= len(s.slots):
            raise StateError(Stat.BADSLOT, f"slot {slotid} of {len(s.slots)}")
        slot = s.slots[slotid]
        if seqid == slot.seqid:
            if slot.busy:
                raise StateError(Stat.DELAY)
            if slot.reply is None:
                raise StateError(Stat.RETRY_UNCACHED_REP)
            return s, slot, slot.reply
        if seqid != (slot.seqid + 1) & NFS4_UINT32_MAX:
            raise StateError(Stat.SEQ_MISORDERED, f"seqid {seqid}, slot at {slot.seqid}")
        size, nops = checks
        if size > s.fore.maxrequestsize:
            raise StateError(Stat.REQ_TOO_BIG)
        if nops > s.fore.maxoperations:
            raise StateError(Stat.TOO_MANY_OPS)
        slot.seqid = seqid
        slot.reply = None
        slot.busy = True
        s.client.last_renew = now
        return s, slot, None

    @staticmethod
    def finish_slot(slot: Slot, reply: bytes | None) -> None:
        slot.reply = reply
        slot.busy = False

    # -------------------------------------------------------------------- open state

    def _drop_open(self, st: OpenState) -> None:
        for lk in st.locks:
            self.stateids.pop(lk.other, None)
        st.locks.clear()
        self.stateids.pop(st.other, None)
        st.client.opens.pop(st.other, None)
        peers = self.by_file.get(st.fh)
        if peers is not None:
            if st in peers:
                peers.remove(st)
            if not peers:
                del self.by_file[st.fh]

    def open(self, c: Client, owner: bytes, fh: bytes, access: int, deny: int,
             now: float) -> OpenState:
        peers = self.by_file.get(fh, [])
        mine = next((o for o in peers if o.client is c and o.owner == owner), None)
        for o in list(peers):
            if o is mine:
                continue
            if o.deny & access or o.access & deny:
                if o.client is not c and self._expired(o.client, now):
                    # a courtesy client: its lease ran out, its state yields to a live one
                    self._purge_client(o.client)
                    continue
                raise StateError(Stat.SHARE_DENIED)
        peers = self.by_file.get(fh, [])
        if mine is not None:
            mine.access |= access
            mine.deny |= deny
            mine.seqid = (mine.seqid % NFS4_UINT32_MAX) + 1
            return mine
        other = self.boot + struct.pack(">Q", self._next())
        st = OpenState(other, 1, c, owner, fh, access, deny)
        self.stateids[other] = st
        c.opens[other] = st
        self.by_file.setdefault(fh, []).append(st)
        return st

    def find(self, sid: StateId, c: Client | None) -> OpenState | LockState:
        """The open or lock state a (non-special) stateid names, with its seqid checked."""
        st = self.stateids.get(sid.other)
        if st is None or (c is not None and st.client is not c):
            if sid.other[:4] != self.boot:
                raise StateError(Stat.STALE_STATEID)
            raise StateError(Stat.BAD_STATEID)
        if sid.seqid != 0:
            if sid.seqid > st.seqid:
                raise StateError(Stat.BAD_STATEID, "seqid from the future")
            if sid.seqid < st.seqid:
                raise StateError(Stat.OLD_STATEID)
        return st

    def status(self, sid: StateId, c: Client | None) -> Stat:
        """TEST_STATEID's answer for one stateid."""
        if sid.is_anonymous or sid.is_bypass or sid.is_current:
            return Stat.BAD_STATEID
        try:
            self.find(sid, c)
        except StateError as exc:
            return exc.stat
        return Stat.OK

    def close(self, st: OpenState) -> None:
        if any(lk.ranges for lk in st.locks):
            raise StateError(Stat.LOCKS_HELD, "byte-range locks are still held")
        self._drop_open(st)

    # -------------------------------------------------------------------- byte-range locks

    def lock_state(self, open_st: OpenState, owner: bytes) -> LockState:
        """The lock owner's state under ``open_st`` (made on the owner's first LOCK)."""
        for lk in open_st.locks:
            if lk.owner == owner:
                return lk
        lk = LockState(self.boot + struct.pack(">Q", self._next()), 0, open_st.client, owner,
                       open_st)
        self.stateids[lk.other] = lk
        open_st.locks.append(lk)
        return lk

    def _conflict(self, fh: bytes, client: Client | None, owner: bytes | None, start: int,
                  end: int, write: bool, now: float) -> LockDenied | None:
        for o in list(self.by_file.get(fh, ())):
            for lk in list(o.locks):
                if lk.client is client and lk.owner == owner:
                    continue
                for s, e, t in lk.ranges:
                    if e <= start or s >= end or not (write or _is_write(t)):
                        continue
                    if lk.client is not client and self._expired(lk.client, now):
                        self._purge_client(lk.client)  # a courtesy client yields
                        return self._conflict(fh, client, owner, start, end, write, now)
                    return LockDenied(s, e, READ_LT if not _is_write(t) else WRITE_LT,
                                      lk.client.clientid, lk.owner)
        return None

    def lock(self, lk: LockState, locktype: int, start: int, end: int, now: float) -> StateId:
        denied = self._conflict(lk.fh, lk.client, lk.owner, start, end, _is_write(locktype),
                                now)
        if denied is not None:
            raise LockConflict(denied)
        lk.ranges = sorted(_subtract(lk.ranges, start, end)
                           + [(start, end, WRITE_LT if _is_write(locktype) else READ_LT)])
        lk.seqid = (lk.seqid % NFS4_UINT32_MAX) + 1
        return lk.stateid()

    def test_lock(self, fh: bytes, client: Client, owner: bytes, locktype: int, start: int,
                  end: int, now: float) -> LockDenied | None:
        return self._conflict(fh, client, owner, start, end, _is_write(locktype), now)

    def unlock(self, lk: LockState, start: int, end: int) -> StateId:
        lk.ranges = _subtract(lk.ranges, start, end)
        lk.seqid = (lk.seqid % NFS4_UINT32_MAX) + 1
        return lk.stateid()

    def free_lock(self, lk: LockState) -> None:
        if lk.ranges:
            raise StateError(Stat.LOCKS_HELD)
        self.stateids.pop(lk.other, None)
        if lk in lk.open.locks:
            lk.open.locks.remove(lk)

    def downgrade(self, st: OpenState, access: int, deny: int) -> OpenState:
        if access & ~st.access or deny & ~st.deny or not access:
            raise StateError(Stat.INVAL, "downgrade must narrow the open")
        st.access = access
        st.deny = deny
        st.seqid = (st.seqid % NFS4_UINT32_MAX) + 1
        return st

    def denied(self, fh: bytes, access: int) -> bool:
        """True when an open of someone denies ``access`` to special-stateid I/O."""
        return any(o.deny & access for o in self.by_file.get(fh, ()))
