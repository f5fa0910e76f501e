"""A small blocking iSCSI initiator (RFC 7143) on the project's own PDU and text codecs.

This is an I/O edge (it owns a socket), used by ``vtl selftest`` and by tests to drive a target
from the outside: ``Initiator.connect(host, port)``, ``login(...)``, ``execute(lun, cdb, ...)``,
``send_targets()``, ``logout()``. :class:`PyscsiDevice` wraps a logged-in session in the device
interface pyscsi's command classes expect (``execute(cmd)``, ``opcodes``, ``devicetype``).

Invariants:
- One connection, one session (MaxConnections=1), ErrorRecoveryLevel 0, one task at a time: a
  command is sent, its data phase served (immediate data, unsolicited Data-Out up to
  FirstBurstLength, then R2T-solicited bursts), and its status awaited before the next one.
- CmdSN advances by one per non-immediate PDU; ExpStatSN follows every status-bearing PDU.
  NOP-In pings from the target (TTT != 0xffffffff) are answered at once, whatever we wait for.
- Every length the target sends is checked: Data-In must land inside the expected transfer
  length, at the next DataSN; R2T must ask for bytes we have. A violation raises
  :class:`InitiatorProtocolError` and the connection is closed (its state is unknown).
- Every wait is bounded by ``timeout`` seconds; on expiry :class:`InitiatorTimeout` is raised
  and the connection is closed.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from pyscsi.pyscsi import scsi_enum_command
from pyscsi.pyscsi.scsi_exception import SCSIDeviceCommandExceptionMeta
from pyscsi.pyscsi.scsi_sense import SCSICheckCondition

from vtl.iscsi import pdu as P
from vtl.iscsi.errors import IscsiError, LoginError, LoginStatus, PduError
from vtl.iscsi.login import CHAP_MD5, chap_response
from vtl.iscsi.text import decode_binary, decode_text, encode_hex, encode_text, parse_number

DEFAULT_INITIATOR_NAME = "iqn.2026-11.org.vtl-appliance:selftest"
DEFAULT_TIMEOUT = 30.0
LOGIN_MAX_RECV = 8192  # MaxRecvDataSegmentLength in force during login (RFC 7143 13.12)
MAX_RECV = 262144  # what we declare for the full feature phase
STATUS_GOOD = 0x00
STATUS_CHECK_CONDITION = 0x02
_LOGIN_STATUS_HINTS = {
    LoginStatus.NOT_FOUND: "no such target on this portal; list them with SendTargets discovery",
    LoginStatus.AUTHENTICATION_FAILURE: "CHAP credentials missing or wrong",
    LoginStatus.AUTHORIZATION_FAILURE: "this initiator name is not allowed on the target",
    LoginStatus.MISSING_PARAMETER: "the login lacked a required key",
    LoginStatus.TARGET_REMOVED: "the target was removed",
}


class InitiatorError(IscsiError):
    """Base of the initiator's own errors (transport level, never a SCSI status)."""


class InitiatorProtocolError(InitiatorError):
    """The target broke the protocol (or rejected a PDU); the connection is closed."""


class InitiatorTimeout(InitiatorError):
    """No answer within the timeout; the connection is closed."""


class InitiatorLoginError(LoginError):
    """A Login Response with a non-zero status (RFC 7143 11.13.5), carried as data."""

    def __init__(self, status: int, message: str) -> None:
        try:
            code: LoginStatus | int = LoginStatus(status)
        except ValueError:
            code = status
        super().__init__(code, message)  # type: ignore[arg-type]


class Reply(NamedTuple):
    """What a target answered to one SCSI command.

    ``residual`` > 0 is an underflow (fewer bytes than expected), < 0 an overflow.
    ``sense`` is the raw sense data (CHECK CONDITION only).
    """

    status: int
    data_in: bytes
    sense: bytes
    residual: int


@dataclass(slots=True)
class Negotiated:
    """Operational values in force after login (RFC 7143 13)."""

    header_digest: bool = False
    data_digest: bool = False
    max_send: int = 8192  # the target's MaxRecvDataSegmentLength
    max_burst: int = 262144
    first_burst: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One SendTargets answer: a target name and its portal addresses (``host:port,tpgt``)."""

    name: str
    addresses: tuple[str, ...]


def _random_isid() -> int:
    """ISID of type 'random' (RFC 7143 11.12.5: T=10b, then 22+24 random bits)."""
    return (0x80 << 40) | int.from_bytes(os.urandom(5), "big") & ((1 << 38) - 1)


def fixed_sense(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed or descriptor sense (SPC-4 4.5); zeros if too short."""
    if len(sense) >= 14 and sense[0] & 0x7F in (0x70, 0x71):
        return sense[2] & 0x0F, sense[12], sense[13]
    if len(sense) >= 4 and sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2], sense[3]
    return 0, 0, 0


class Initiator:
    """One blocking iSCSI connection/session. Use as a context manager to always close it."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock: socket.socket | None = sock
        self.timeout = timeout
        self.isid = _random_isid()
        self.tsih = 0
        self.cmdsn = 1
        self.expstatsn = 0
        self.maxcmdsn = 1
        self.params = Negotiated()
        self.target_name = ""
        self.session_type = ""
        self.logged_in = False
        self.pings_answered = 0
        self._itt = 0
        self._reader = P.PduReader(LOGIN_MAX_RECV)

    # --- connection -------------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> "Initiator":
        """Open a TCP connection to a portal (no login yet)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise InitiatorError(f"cannot connect to iSCSI portal {host}:{port}: "
                                 f"{exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout=timeout)

    def __enter__(self) -> "Initiator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(logout=exc == (None, None, None))

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self, *, logout: bool = True) -> None:
        """Log out (best effort) if logged in, then close the socket."""
        if self._sock is None:
            return
        if logout and self.logged_in:
            try:
                self.logout()
            except (InitiatorError, OSError):
                pass
        self._drop()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self.logged_in = False
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # --- wire -------------------------------------------------------------------------------
    def _next_itt(self) -> int:
        self._itt = (self._itt + 1) & 0x7FFFFFFF or 1
        return self._itt

    def _send(self, pdu: P.Pdu, data: bytes | memoryview | None = None) -> None:
        if self._sock is None:
            raise InitiatorError("not connected")
        bufs = P.encode_pdu(pdu, header_digest=self._reader.header_digest,
                            data_digest=self._reader.data_digest, data=data)
        try:
            self._sock.sendall(b"".join(bufs))
        except socket.timeout:
            self._drop()
            raise InitiatorTimeout(f"sending {type(pdu).__name__} timed out") from None
        except OSError as exc:
            self._drop()
            raise InitiatorError(f"connection lost while sending: {exc.strerror or exc}") from None

    def _recv(self, deadline: float) -> P.Pdu:
        """The next PDU from the target (NOP-In pings are answered and skipped)."""
        while True:
            try:
                pdu = self._reader.next_pdu()
            except PduError as err:
                self._drop()
                raise InitiatorProtocolError(f"bad PDU from target: {err}") from None
            if pdu is not None:
                if isinstance(pdu, P.NopIn) and pdu.ttt != P.RESERVED_TAG:
                    self._answer_ping(pdu)
                    continue
                return pdu
            if self._sock is None:
                raise InitiatorError("not connected")
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop()
                raise InitiatorTimeout(f"no answer from the target within {self.timeout:g} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                self._drop()
                raise InitiatorError(f"connection lost: {exc.strerror or exc}") from None
            if not chunk:
                self._drop()
                raise InitiatorError("the target closed the connection")
            self._reader.feed(chunk)

    def _answer_ping(self, ping: P.NopIn) -> None:
        """RFC 7143 11.18: answer a target ping with TTT copied, ITT reserved, immediate."""
        self._track(ping, status=False)
        self._send(P.NopOut(immediate=True, lun=ping.lun, itt=P.RESERVED_TAG, ttt=ping.ttt,
                            cmdsn=self.cmdsn, expstatsn=self.expstatsn))
        self.pings_answered += 1

    def _track(self, pdu: Any, *, status: bool = True) -> None:
        """Follow StatSN / MaxCmdSN (RFC 7143 4.2.2)."""
        if status:
            sn = (pdu.statsn + 1) & 0xFFFFFFFF
            if P.sn_lt(self.expstatsn, sn) or not self.logged_in:
                self.expstatsn = sn
        mx = getattr(pdu, "maxcmdsn", None)
        if mx is not None and P.sn_le(self.maxcmdsn, mx):
            self.maxcmdsn = mx

    def _unexpected(self, pdu: P.Pdu, waiting: str) -> InitiatorError:
        if isinstance(pdu, P.Reject):
            err = InitiatorProtocolError(f"the target rejected our PDU (reason 0x{pdu.reason:02x})"
                                         f" while waiting for {waiting}")
        elif isinstance(pdu, P.AsyncMessage):
            err = InitiatorProtocolError(f"asynchronous message event {pdu.event} from the "
                                         f"target while waiting for {waiting}")
        else:
            err = InitiatorProtocolError(f"unexpected {type(pdu).__name__} while waiting for "
                                         f"{waiting}")
        self._drop()
        return err

    # --- login (RFC 7143 6.3, 11.12, 11.13) ---------------------------------------------------
    def login(self, target_name: str = "", *, initiator_name: str = DEFAULT_INITIATOR_NAME,
              discovery: bool = False, chap_user: str | None = None,
              chap_secret: str | bytes | None = None, digests: bool = False) -> Negotiated:
        """Log in (Normal session to ``target_name``, or Discovery); raises
        :class:`InitiatorLoginError` carrying the target's status on refusal."""
        if self.logged_in:
            raise InitiatorError("already logged in")
        self.session_type = "Discovery" if discovery else "Normal"
        self.target_name = target_name
        secret = chap_secret.encode() if isinstance(chap_secret, str) else chap_secret
        itt = self._next_itt()
        first = [("InitiatorName", initiator_name), ("SessionType", self.session_type)]
        if not discovery:
            if not target_name:
                raise ValueError("a Normal session needs a target name")
            first.append(("TargetName", target_name))
        auth = "CHAP,None" if chap_user else "None"
        answers = self._login_step(itt, 0, 1, first + [("AuthMethod", auth)], want_transit=False)
        stage = answers.pop("__stage__")
        if stage == "0":  # still in the security stage: the target wants CHAP
            if answers.get("AuthMethod") != "CHAP":
                raise InitiatorLoginError(LoginStatus.AUTHENTICATION_FAILURE,
                                          f"login to {target_name or 'discovery'}: target chose "
                                          f"AuthMethod {answers.get('AuthMethod')!r}")
            if not chap_user or secret is None:
                raise InitiatorLoginError(LoginStatus.AUTHENTICATION_FAILURE,
                                          "the target requires CHAP; give a CHAP user and secret")
            chal = self._login_step(itt, 0, 1, [("CHAP_A", str(CHAP_MD5))], want_transit=False)
            try:
                ident = parse_number(chal["CHAP_I"], 0, 255)
                challenge = decode_binary(chal["CHAP_C"])
            except (KeyError, IscsiError):
                self._drop()
                raise InitiatorProtocolError("the target sent no usable CHAP challenge") from None
            resp = encode_hex(chap_response(ident, secret, challenge))
            done = self._login_step(itt, 0, 1, [("CHAP_N", chap_user), ("CHAP_R", resp)],
                                    want_transit=True)
            if done.pop("__stage__") != "1":
                raise InitiatorProtocolError("the target did not end the security stage")
        ops = self._operational_keys(discovery, digests)
        final = self._login_step(itt, 1, 3, ops, want_transit=True)
        self._apply(final)
        self.logged_in = True
        self._reader.header_digest = self.params.header_digest
        self._reader.data_digest = self.params.data_digest
        self._reader.max_data = MAX_RECV
        return self.params

    def _login_step(self, itt: int, csg: int, nsg: int, keys: list[tuple[str, str]],
                    *, want_transit: bool) -> dict[str, str]:
        """One login request/response exchange; returns the answered keys plus the stage
        reached as ``__stage__``. Loops while the target asks for more (C bit, or no T yet)."""
        data = encode_text(keys)
        deadline = time.monotonic() + self.timeout
        out: dict[str, str] = {}
        transit = want_transit or csg == 0
        rounds = 0
        while True:
            self._send(P.LoginRequest(transit=transit, cont=False, csg=csg, nsg=nsg if transit
                                      else 0, version_max=0, version_min=0, isid=self.isid,
                                      tsih=self.tsih, itt=itt, cid=0, cmdsn=self.cmdsn,
                                      expstatsn=self.expstatsn, data=data))
            rsp = self._recv(deadline)
            if not isinstance(rsp, P.LoginResponse):
                raise self._unexpected(rsp, "a Login Response")
            if rsp.status != 0:
                self._drop()
                raise self._login_failure(rsp.status)
            self._track(rsp)
            try:
                out.update(decode_text(rsp.data))
            except IscsiError as err:
                self._drop()
                raise InitiatorProtocolError(f"bad login text: {err}") from None
            if rsp.transit:
                self.tsih = rsp.tsih or self.tsih
                out["__stage__"] = str(rsp.nsg)
                return out
            if rsp.cont or (want_transit and csg != 0):
                data = b""  # RFC 7143 11.13: ask for the rest / for the transition
                rounds += 1
                if rounds > 8:
                    self._drop()
                    raise InitiatorProtocolError(f"the target does not leave login stage {csg}")
                continue
            out["__stage__"] = str(rsp.csg)
            return out

    def _login_failure(self, status: int) -> InitiatorLoginError:
        try:
            name = LoginStatus(status).name
            hint = _LOGIN_STATUS_HINTS.get(LoginStatus(status), "")
        except ValueError:
            name, hint = f"0x{status:04x}", ""
        what = self.target_name or "the discovery session"
        msg = f"login to {what} refused: {name} (status 0x{status:04x})"
        return InitiatorLoginError(status, msg + (f": {hint}" if hint else ""))

    @staticmethod
    def _operational_keys(discovery: bool, digests: bool) -> list[tuple[str, str]]:
        digest = "CRC32C,None" if digests else "None"
        keys = [("HeaderDigest", digest), ("DataDigest", digest),
                ("MaxRecvDataSegmentLength", str(MAX_RECV))]
        if discovery:
            return keys
        return keys + [("InitialR2T", "No"), ("ImmediateData", "Yes"),
                       ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144"),
                       ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
                       ("DataSequenceInOrder", "Yes"), ("DefaultTime2Wait", "2"),
                       ("DefaultTime2Retain", "0"), ("ErrorRecoveryLevel", "0"),
                       ("MaxConnections", "1")]

    def _apply(self, answers: dict[str, str]) -> None:
        p = self.params
        try:
            p.header_digest = answers.get("HeaderDigest", "None") == "CRC32C"
            p.data_digest = answers.get("DataDigest", "None") == "CRC32C"
            if "MaxRecvDataSegmentLength" in answers:
                p.max_send = parse_number(answers["MaxRecvDataSegmentLength"], 512, 16777215)
            if "MaxBurstLength" in answers:
                p.max_burst = parse_number(answers["MaxBurstLength"], 512, 16777215)
            if "FirstBurstLength" in answers:
                p.first_burst = parse_number(answers["FirstBurstLength"], 512, 16777215)
            p.first_burst = min(p.first_burst, p.max_burst)
            p.initial_r2t = answers.get("InitialR2T", "Yes") == "Yes"
            p.immediate_data = answers.get("ImmediateData", "Yes") == "Yes"
        except IscsiError as err:
            self._drop()
            raise InitiatorProtocolError(f"bad negotiated value: {err}") from None

    # --- full feature phase ----------------------------------------------------------------
    def _need_session(self, kind: str) -> None:
        if not self.logged_in or self._sock is None:
            raise InitiatorError("not logged in")
        if self.session_type != kind:
            raise InitiatorError(f"not possible in a {self.session_type} session")

    def execute(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview = b"",
                expect_in: int = 0) -> Reply:
        """Run one SCSI command (RFC 7143 11.3-11.8) and return its :class:`Reply`."""
        self._need_session("Normal")
        if not 1 <= len(cdb) <= 16:
            raise ValueError("CDBs longer than 16 bytes are not supported")
        if data_out and expect_in:
            raise ValueError("bidirectional commands are not supported")
        # a bytearray is copied: the caller may reuse it while R2Ts still ask for its bytes
        out = memoryview(bytes(data_out) if isinstance(data_out, bytearray) else data_out)
        total = len(out)
        p = self.params
        itt = self._next_itt()
        lun_raw = (bytes([0, lun]) if lun < 256 else
                   bytes([0x40 | (lun >> 8) & 0x3F, lun & 0xFF])) + bytes(6)
        immediate = out[:min(p.first_burst, p.max_send, total)] if p.immediate_data else out[:0]
        unsol_end = 0 if p.initial_r2t else min(p.first_burst, total)
        more_unsol = not p.initial_r2t and len(immediate) < unsol_end
        cmdsn = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        self._send(P.ScsiCommandPdu(immediate=False, final=not more_unsol, read=expect_in > 0,
                                    write=total > 0, attr=1, lun=lun_raw, itt=itt,
                                    edtl=total if total else expect_in, cmdsn=cmdsn,
                                    expstatsn=self.expstatsn, cdb=bytes(cdb).ljust(16, b"\0")),
                   data=immediate)
        if more_unsol:
            self._send_data(out, lun_raw, itt, P.RESERVED_TAG, len(immediate), unsol_end)
        return self._await_status(itt, lun_raw, out, expect_in)

    def _send_data(self, out: memoryview, lun_raw: bytes, itt: int, ttt: int, start: int,
                   end: int) -> None:
        """Data-Out PDUs for [start, end), DataSN from 0, F on the last (RFC 7143 11.7)."""
        datasn, offset, chunk = 0, start, self.params.max_send
        while offset < end:
            n = min(chunk, end - offset)
            self._send(P.DataOut(final=offset + n >= end, lun=lun_raw, itt=itt, ttt=ttt,
                                 expstatsn=self.expstatsn, datasn=datasn, offset=offset),
                       data=out[offset:offset + n])
            datasn += 1
            offset += n

    def _await_status(self, itt: int, lun_raw: bytes, out: memoryview, expect_in: int) -> Reply:
        deadline = time.monotonic() + self.timeout
        buf = bytearray(expect_in)
        received = 0
        next_datasn = 0
        while True:
            pdu = self._recv(deadline)
            if getattr(pdu, "itt", itt) != itt and not isinstance(pdu, (P.Reject,
                                                                        P.AsyncMessage)):
                raise self._unexpected(pdu, f"the answer to task 0x{itt:08x}")
            if isinstance(pdu, P.DataIn):
                n = len(pdu.data)
                if pdu.datasn != next_datasn or pdu.offset + n > expect_in:
                    self._drop()
                    raise InitiatorProtocolError(
                        f"Data-In DataSN {pdu.datasn} offset {pdu.offset} length {n} outside the "
                        f"expected {expect_in} bytes (next DataSN {next_datasn})")
                buf[pdu.offset:pdu.offset + n] = pdu.data
                received = max(received, pdu.offset + n)
                next_datasn += 1
                self._track(pdu, status=pdu.has_status)
                if pdu.has_status:
                    residual = pdu.residual if pdu.underflow else \
                        -pdu.residual if pdu.overflow else 0
                    return Reply(pdu.status, bytes(buf[:received]), b"", residual)
            elif isinstance(pdu, P.R2T):
                self._track(pdu, status=False)
                if pdu.length == 0 or pdu.offset + pdu.length > len(out):
                    self._drop()
                    raise InitiatorProtocolError(f"R2T for bytes {pdu.offset}+{pdu.length} of a "
                                                 f"{len(out)}-byte write")
                self._send_data(out, lun_raw, itt, pdu.ttt, pdu.offset, pdu.offset + pdu.length)
            elif isinstance(pdu, P.ScsiResponsePdu):
                self._track(pdu)
                if pdu.response != 0:
                    raise InitiatorProtocolError(f"iSCSI response 0x{pdu.response:02x} (target "
                                                 "failure) for the command")
                sense = b""
                if len(pdu.data) >= 2:
                    slen = int.from_bytes(pdu.data[:2], "big")
                    if slen > len(pdu.data) - 2:
                        self._drop()
                        raise InitiatorProtocolError("SenseLength beyond the data segment")
                    sense = bytes(pdu.data[2:2 + slen])
                residual = pdu.residual if pdu.underflow else \
                    -pdu.residual if pdu.overflow else 0
                return Reply(pdu.status, bytes(buf[:received]), sense, residual)
            else:
                raise self._unexpected(pdu, f"the answer to task 0x{itt:08x}")

    def ping(self, data: bytes = b"") -> bytes:
        """NOP-Out ping (RFC 7143 11.18); returns the echoed data."""
        if not self.logged_in:
            raise InitiatorError("not logged in")
        itt = self._next_itt()
        self._send(P.NopOut(immediate=True, itt=itt, ttt=P.RESERVED_TAG, cmdsn=self.cmdsn,
                            expstatsn=self.expstatsn), data=data)
        pdu = self._recv(time.monotonic() + self.timeout)
        if not isinstance(pdu, P.NopIn) or pdu.itt != itt:
            raise self._unexpected(pdu, "a NOP-In")
        self._track(pdu)
        return bytes(pdu.data)

    def send_targets(self, value: str = "All") -> list[DiscoveredTarget]:
        """SendTargets (RFC 7143 Appendix C) in a Discovery session; follows continuations."""
        self._need_session("Discovery")
        itt = self._next_itt()
        data = encode_text([("SendTargets", value)])
        ttt = P.RESERVED_TAG
        text = bytearray()
        deadline = time.monotonic() + self.timeout
        while True:
            cmdsn = self.cmdsn
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
            self._send(P.TextRequest(immediate=False, final=True, itt=itt, ttt=ttt, cmdsn=cmdsn,
                                     expstatsn=self.expstatsn, data=data))
            rsp = self._recv(deadline)
            if not isinstance(rsp, P.TextResponse) or rsp.itt != itt:
                raise self._unexpected(rsp, "a Text Response")
            self._track(rsp)
            text += rsp.data
            if rsp.final:
                break
            ttt, data = rsp.ttt, b""
        found: list[DiscoveredTarget] = []
        name, addrs = "", list[str]()
        for key, val in decode_text(bytes(text)):
            if key == "TargetName":
                if name:
                    found.append(DiscoveredTarget(name, tuple(addrs)))
                name, addrs = val, []
            elif key == "TargetAddress" and name:
                addrs.append(val)
        if name:
            found.append(DiscoveredTarget(name, tuple(addrs)))
        return found

    def logout(self) -> None:
        """Logout (close the session, RFC 7143 11.14) and close the connection."""
        if not self.logged_in or self._sock is None:
            self._drop()
            return
        itt = self._next_itt()
        cmdsn = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        self._send(P.LogoutRequest(immediate=False, reason=P.LogoutReason.CLOSE_SESSION,
                                   itt=itt, cid=0, cmdsn=cmdsn, expstatsn=self.expstatsn))
        try:
            rsp = self._recv(time.monotonic() + self.timeout)
            if not isinstance(rsp, P.LogoutResponse) or rsp.itt != itt:
                raise self._unexpected(rsp, "a Logout Response")
            if rsp.response != 0:
                raise InitiatorProtocolError(f"logout refused (response {rsp.response})")
        finally:
            self._drop()


# --- pyscsi adapter -----------------------------------------------------------------------------

class ScsiStatusError(Exception):
    """A SCSI status other than GOOD or CHECK CONDITION (BUSY, RESERVATION CONFLICT, ...)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"SCSI status 0x{status:02x}")
        self.status = status


class CheckCondition(SCSICheckCondition):
    """pyscsi's CheckCondition with the raw sense and its decoded key/ASC/ASCQ as data."""

    def __init__(self, sense: bytes) -> None:
        self.sense = bytes(sense)
        self.sense_key, self.asc, self.ascq = fixed_sense(self.sense)
        self.valid = self.sense[0] & 0x80 if self.sense else 0
        self.response_code = self.sense[0] & 0x7F if self.sense else 0
        self.data = {}
        self.show_data = False
        if self.response_code == 0x70 and len(self.sense) >= 18:
            self.data = self.unmarshall_fixed_format_sense_data(self.sense)
        Exception.__init__(self, str(self))

    @property
    def filemark(self) -> bool:
        return len(self.sense) > 2 and self.response_code in (0x70, 0x71) and \
            bool(self.sense[2] & 0x80)

    def __str__(self) -> str:
        return (f"CHECK CONDITION: sense key 0x{self.sense_key:x}, "
                f"ASC/ASCQ {self.asc:02x}/{self.ascq:02x}")


class PyscsiDevice(metaclass=SCSIDeviceCommandExceptionMeta):
    """A logged-in :class:`Initiator` as a pyscsi device (``pyscsi.pyscsi.scsi.SCSI(dev)``).

    ``execute(cmd)`` sends ``cmd.cdb`` with ``cmd.dataout`` or for ``len(cmd.datain)`` bytes,
    fills ``cmd.datain`` from the start, and raises :class:`CheckCondition` (a subclass of
    pyscsi's) carrying the sense on CHECK CONDITION. ``last`` is the last :class:`Reply`.
    """

    def __init__(self, initiator: Initiator, lun: int = 0) -> None:
        self.initiator = initiator
        self.lun = lun
        self._opcodes = scsi_enum_command.spc
        self._devicetype: int | None = None
        self.last: Reply | None = None

    def __enter__(self) -> "PyscsiDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.initiator.close()

    CheckCondition: type[CheckCondition]

    def execute(self, cmd: Any) -> None:
        datain = cmd.datain if cmd.datain is not None else bytearray()
        dataout = bytes(cmd.dataout or b"")
        reply = self.initiator.execute(self.lun, bytes(cmd.cdb), dataout,
                                       0 if dataout else len(datain))
        self.last = reply
        n = len(reply.data_in)
        if n:
            datain[:n] = reply.data_in
        if reply.status == STATUS_CHECK_CONDITION:
            cmd.sense = reply.sense
            raise self.CheckCondition(reply.sense)
        if reply.status != STATUS_GOOD:
            raise ScsiStatusError(reply.status)

    @property
    def opcodes(self) -> Any:
        return self._opcodes

    @opcodes.setter
    def opcodes(self, value: Any) -> None:
        self._opcodes = value

    @property
    def devicetype(self) -> int | None:
        return self._devicetype

    @devicetype.setter
    def devicetype(self, value: int) -> None:
        self._devicetype = value


PyscsiDevice.CheckCondition = CheckCondition  # the metaclass made a plain one; ours has data


def open_session(host: str, port: int, target_name: str, *,
                 initiator_name: str = DEFAULT_INITIATOR_NAME, timeout: float = DEFAULT_TIMEOUT,
                 chap_user: str | None = None, chap_secret: str | None = None,
                 digests: bool = False) -> Initiator:
    """Connect and log in to ``target_name``; the connection is closed if login fails."""
    ini = Initiator.connect(host, port, timeout=timeout)
    try:
        ini.login(target_name, initiator_name=initiator_name, chap_user=chap_user,
                  chap_secret=chap_secret, digests=digests)
    except BaseException:
        ini.close(logout=False)
        raise
    return ini


def discover(host: str, port: int, *, initiator_name: str = DEFAULT_INITIATOR_NAME,
             timeout: float = DEFAULT_TIMEOUT) -> list[DiscoveredTarget]:
    """SendTargets=All through a Discovery session."""
    with Initiator.connect(host, port, timeout=timeout) as ini:
        ini.login(discovery=True, initiator_name=initiator_name)
        return ini.send_targets("All")


__all__ = ["CheckCondition", "DiscoveredTarget", "Initiator", "InitiatorError",
           "InitiatorLoginError", "InitiatorProtocolError", "InitiatorTimeout", "Negotiated",
           "PyscsiDevice", "Reply", "ScsiStatusError", "discover", "fixed_sense", "open_session"]
