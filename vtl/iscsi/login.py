"""The target side of the iSCSI login phase (RFC 7143 6, 11.12, 11.13, 12, 13).

:class:`LoginMachine` takes Login Request PDUs and returns Login Response PDUs. It is pure: no
sockets, no clock; randomness for CHAP challenges is injected.

Invariants:
- Stages go 0 (security) -> 1 (operational) -> 3 (full feature) only forward and only when the
  initiator asks (T bit) and the stage allows it: the security stage ends only after the target's
  AuthMethod succeeded (RFC 7143 6.3).
- A failure answers exactly one Login Response with a non-zero Status-Class/Detail
  (RFC 7143 11.13.5) and leaves the machine failed; the connection then closes.
- Every negotiated key is answered once; keys we do not know are answered NotUnderstood
  (RFC 7143 6.2), so an initiator's X- / vendor keys never fail a login.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from vtl.iscsi.errors import LoginError, LoginStatus, TextError
from vtl.iscsi.pdu import LoginRequest, LoginResponse
from vtl.iscsi.target import IscsiTarget, TargetAuth, TargetRegistry
from vtl.iscsi.text import MAX_TEXT, decode_binary, decode_text, encode_hex, encode_text, \
    parse_number

log = logging.getLogger("vtl.iscsi")

CHAP_MD5 = 5  # RFC 7143 12.1.3: CHAP_A=5 is MD5
CHALLENGE_LEN = 16
MAX_NUMBER = 16777215
LOGIN_MAX_RECV = 8192  # MaxRecvDataSegmentLength during login (RFC 7143 13.12)


class Stage(enum.IntEnum):
    """CSG/NSG values (RFC 7143 11.12.3)."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """What the target offers/accepts; defaults suit streaming (AWS's advice, FACTS.md)."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 16
    default_time2wait: int = 2
    default_time2retain: int = 20
    cmd_window: int = 64  # MaxCmdSN - ExpCmdSN + 1 (RFC 7143 4.2.2.1)


@dataclass(slots=True)
class SessionParams:
    """Negotiated values (RFC 7143 13); initial values are the RFC defaults."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # ours, declared to the initiator
    max_send_data_segment_length: int = 8192  # the initiator's MaxRecvDataSegmentLength
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    initiator_alias: str = ""


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP response MD5(identifier || secret || challenge) (RFC 1994 4.1, RFC 7143 12.1.3)."""
    return hashlib.md5(bytes([ident & 0xFF]) + secret + challenge).digest()


def _yes_no(value: str) -> bool:
    if value not in ("Yes", "No"):
        raise TextError(f"expected Yes or No, got {value[:20]!r}")
    return value == "Yes"


def _yn(flag: bool) -> str:
    return "Yes" if flag else "No"


_SESSION_KEYS = frozenset({"InitiatorName", "TargetName", "SessionType"})
_IRRELEVANT = frozenset({"IFMarkInt", "OFMarkInt", "TargetAlias", "TargetAddress",
                         "TargetPortalGroupTag", "SendTargets"})
_SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})


@dataclass
class LoginMachine:
    """One connection's login (RFC 7143 6.3). Feed :meth:`receive`; check ``done``/``failed``.

    ``tsih`` is the handle this session gets on success (allocated by the server, non-zero);
    ``portal_group_tag`` is returned in the first response of a Normal session (13.9).
    """

    registry: TargetRegistry
    tsih: int
    portal_group_tag: int = 1
    settings: TargetSettings = field(default_factory=TargetSettings)
    random_bytes: Callable[[int], bytes] = os.urandom

    params: SessionParams = field(default_factory=SessionParams)
    stage: Stage = Stage.SECURITY
    done: bool = False
    failed: bool = False
    target: IscsiTarget | None = None
    session_type: SessionType = SessionType.NORMAL
    initiator_name: str = ""
    isid: int = 0
    statsn: int = 0  # StatSN of the next response
    expcmdsn: int = 0
    _first: bool = True
    _auth: TargetAuth = field(default_factory=TargetAuth)
    _auth_done: bool = False
    _chap_state: str = ""
    _chap_id: int = 0
    _chap_challenge: bytes = b""
    _pending_text: bytearray = field(default_factory=bytearray)
    _declared: bool = False
    _itt: int = 0

    # --- entry point ---------------------------------------------------------------------------
    def receive(self, req: LoginRequest) -> LoginResponse:
        """Answer one Login Request. Never raises on bad input: failures become a status."""
        if self.done or self.failed:
            return self.fail(req, LoginStatus.INVALID_DURING_LOGIN)
        try:
            return self._receive(req)
        except LoginError as err:
            log.info("login of %s refused (%s): %s", self.initiator_name or "?",
                     err.status.name, err)
            return self.fail(req, err.status)
        except TextError as err:
            log.info("login of %s refused: bad text: %s", self.initiator_name or "?", err)
            return self.fail(req, LoginStatus.INITIATOR_ERROR)

    # --- internals -----------------------------------------------------------------------------
    def _response(self, req: LoginRequest, *, transit: bool, csg: int, nsg: int, data: bytes = b"",
                  tsih: int | None = None, status: int = 0) -> LoginResponse:
        rsp = LoginResponse(transit=transit, cont=False, csg=csg, nsg=nsg if transit else 0,
                            version_max=0, version_active=0, isid=req.isid,
                            tsih=req.tsih if tsih is None else tsih, itt=req.itt,
                            statsn=self.statsn, expcmdsn=self.expcmdsn,
                            maxcmdsn=(self.expcmdsn + self.settings.cmd_window - 1) & 0xFFFFFFFF,
                            status=status, data=data)
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return rsp

    def fail(self, req: LoginRequest, status: LoginStatus) -> LoginResponse:
        """End the login with ``status`` (RFC 7143 11.13.5); the caller closes the connection."""
        self.failed = True
        if self._first:
            self.statsn, self.expcmdsn = req.expstatsn, req.cmdsn
            self._first = False
        return self._response(req, transit=False, csg=req.csg, nsg=0, tsih=0, status=status)

    def _receive(self, req: LoginRequest) -> LoginResponse:
        if self._first:
            self.statsn, self.expcmdsn = req.expstatsn, req.cmdsn
            self.isid, self._itt = req.isid, req.itt
            if req.version_min > 0:
                raise LoginError(LoginStatus.UNSUPPORTED_VERSION, "iSCSI version")
            if req.tsih != 0:
                raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, "adding connections")
        elif req.isid != self.isid:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "ISID changed during login")
        if req.csg != self.stage:
            if not (self._first and req.csg == Stage.OPERATIONAL):
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"CSG {req.csg} in stage {self.stage}")
        if req.transit and not self._valid_transition(req.csg, req.nsg):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"bad transition {req.csg}->{req.nsg}")
        if len(self._pending_text) + len(req.data) > MAX_TEXT:
            raise LoginError(LoginStatus.OUT_OF_RESOURCES, "login text too long")
        self._pending_text += req.data
        if req.cont:  # RFC 7143 11.12.2: answer each continued PDU with an empty response
            if req.transit:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "C and T bits both set")
            was_first = self._first
            self._first = False
            rsp = self._response(req, transit=False, csg=req.csg, nsg=0)
            self._first = was_first
            return rsp
        pairs = decode_text(bytes(self._pending_text))
        self._pending_text.clear()
        log.debug("login keys (CSG %d): %s", req.csg,
                  [(k, v) for k, v in pairs if not k.startswith("CHAP_")])
        answers: list[tuple[str, str]] = []
        first = self._first
        if first:
            self._start_session(pairs, answers)
            self._first = False
            if req.csg == Stage.OPERATIONAL:
                self._skip_security()
        self.stage = Stage(req.csg)
        for key, value in pairs:
            if key in _SESSION_KEYS:
                if not first:
                    self._check_unchanged(key, value)
                continue
            if key in _SECURITY_KEYS:
                if req.csg != Stage.SECURITY:
                    raise LoginError(LoginStatus.INITIATOR_ERROR, f"{key} outside security stage")
                continue
            answers.extend(self._operational(key, value))
        if req.csg == Stage.SECURITY:
            answers.extend(self._security(pairs))
        transit = bool(req.transit)
        if transit and req.csg == Stage.SECURITY and not self._auth_done:
            transit = False
        if req.csg == Stage.OPERATIONAL or (transit and req.nsg == Stage.FULL_FEATURE):
            answers.extend(self._declare())
        tsih: int | None = None
        if transit:
            self.stage = Stage(req.nsg)
            if req.nsg == Stage.FULL_FEATURE:
                self.done = True
                tsih = self.tsih
                self._finish_params()
        return self._response(req, transit=transit, csg=req.csg, nsg=req.nsg,
                              data=encode_text(answers), tsih=tsih)

    @staticmethod
    def _valid_transition(csg: int, nsg: int) -> bool:
        return (csg, nsg) in ((0, 1), (0, 3), (1, 3))

    def _start_session(self, pairs: list[tuple[str, str]], answers: list[tuple[str, str]]) -> None:
        keys = dict(pairs)
        name = keys.get("InitiatorName", "")
        if not name:
            raise LoginError(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        self.initiator_name = name
        stype = keys.get("SessionType", "Normal")
        if stype == "Discovery":
            self.session_type = SessionType.DISCOVERY
            self._auth = self.registry.discovery_auth
        elif stype == "Normal":
            tname = keys.get("TargetName", "")
            if not tname:
                raise LoginError(LoginStatus.MISSING_PARAMETER, "no TargetName")
            target = self.registry.lookup(tname)
            if target is None:
                raise LoginError(LoginStatus.NOT_FOUND, f"no target {tname}")
            self.target = target
            self._auth = target.auth
            answers.append(("TargetPortalGroupTag", str(self.portal_group_tag)))
            if target.alias:
                answers.append(("TargetAlias", target.alias))
        else:
            raise LoginError(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {stype}")
        if not self._auth.allows(name):
            raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, f"{name} not allowed")

    def _check_unchanged(self, key: str, value: str) -> None:
        current = {"InitiatorName": self.initiator_name,
                   "SessionType": self.session_type.value,
                   "TargetName": self.target.name if self.target else ""}[key]
        if value != current:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"{key} changed during login")

    def _skip_security(self) -> None:
        if self._auth.chap is not None:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
        self._auth_done = True

    # --- security stage (RFC 7143 12.1.3) --------------------------------------------------------
    def _security(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        keys = dict(pairs)
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            if self._chap_state or self._auth_done:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "AuthMethod renegotiated")
            offered = keys["AuthMethod"].split(",")
            ours = "CHAP" if self._auth.chap is not None else "None"
            if ours not in offered:
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE,
                                 f"AuthMethod {keys['AuthMethod']!r}, need {ours}")
            out.append(("AuthMethod", ours))
            if ours == "None":
                self._auth_done = True
            else:
                self._chap_state = "A"
        elif not self._chap_state and not self._auth_done:
            if self._auth.chap is not None:
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
            self._auth_done = True  # no AuthMethod offered: None is the only match
        if "CHAP_A" in keys:
            if self._chap_state != "A":
                raise LoginError(LoginStatus.INITIATOR_ERROR, "unexpected CHAP_A")
            if str(CHAP_MD5) not in keys["CHAP_A"].split(","):
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP_A without MD5")
            self._chap_id = self.random_bytes(1)[0]
            self._chap_challenge = self.random_bytes(CHALLENGE_LEN)
            self._chap_state = "R"
            out += [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(self._chap_id)),
                    ("CHAP_C", encode_hex(self._chap_challenge))]
        elif "CHAP_R" in keys or "CHAP_N" in keys:
            out += self._chap_verify(keys)
        return out

    def _chap_verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        chap = self._auth.chap
        if self._chap_state != "R" or chap is None:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "unexpected CHAP_R")
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP_N and CHAP_R required")
        try:
            response = decode_binary(keys["CHAP_R"])
        except TextError as err:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "bad CHAP_R") from err
        expect = chap_response(self._chap_id, chap.secret, self._chap_challenge)
        if keys["CHAP_N"] != chap.user or not hmac.compare_digest(response, expect):
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP response mismatch")
        self._chap_state = ""
        self._auth_done = True
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        mutual = self._auth.mutual
        if mutual is None or "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP not possible")
        try:
            ident = parse_number(keys["CHAP_I"], 0, 255)
            challenge = decode_binary(keys["CHAP_C"])
        except TextError as err:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "bad CHAP_I/CHAP_C") from err
        if challenge == self._chap_challenge:  # RFC 7143 12.1.3: reflected challenge
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "reflected CHAP challenge")
        return [("CHAP_N", mutual.user),
                ("CHAP_R", encode_hex(chap_response(ident, mutual.secret, challenge)))]

    # --- operational stage (RFC 7143 13) -------------------------------------------------------
    def _operational(self, key: str, value: str) -> list[tuple[str, str]]:
        s, p = self.settings, self.params
        try:
            if key in ("HeaderDigest", "DataDigest"):
                choice = next((v for v in value.split(",") if v in ("CRC32C", "None")), None)
                if choice is None:
                    return [(key, "Reject")]
                setattr(p, "header_digest" if key == "HeaderDigest" else "data_digest",
                        choice == "CRC32C")
                return [(key, choice)]
            if key == "MaxRecvDataSegmentLength":  # declarative, per direction (13.12)
                p.max_send_data_segment_length = parse_number(value, 512, MAX_NUMBER)
                return []
            if key == "MaxBurstLength":
                p.max_burst_length = min(parse_number(value, 512, MAX_NUMBER), s.max_burst_length)
                return [(key, str(p.max_burst_length))]
            if key == "FirstBurstLength":
                p.first_burst_length = min(parse_number(value, 512, MAX_NUMBER),
                                           s.first_burst_length)
                return [(key, str(p.first_burst_length))]
            if key == "InitialR2T":
                p.initial_r2t = _yes_no(value) or s.initial_r2t
                return [(key, _yn(p.initial_r2t))]
            if key == "ImmediateData":
                p.immediate_data = _yes_no(value) and s.immediate_data
                return [(key, _yn(p.immediate_data))]
            if key == "MaxOutstandingR2T":
                p.max_outstanding_r2t = min(parse_number(value, 1, 65535), s.max_outstanding_r2t)
                return [(key, str(p.max_outstanding_r2t))]
            if key in ("DataPDUInOrder", "DataSequenceInOrder"):
                _yes_no(value)
                return [(key, "Yes")]  # OR with our Yes (13.18, 13.19)
            if key == "DefaultTime2Wait":
                p.default_time2wait = max(parse_number(value, 0, 3600), s.default_time2wait)
                return [(key, str(p.default_time2wait))]
            if key == "DefaultTime2Retain":
                p.default_time2retain = min(parse_number(value, 0, 3600), s.default_time2retain)
                return [(key, str(p.default_time2retain))]
            if key == "ErrorRecoveryLevel":
                parse_number(value, 0, 2)
                p.error_recovery_level = 0
                return [(key, "0")]
            if key == "MaxConnections":
                parse_number(value, 1, 65535)
                return [(key, "1")]
            if key in ("IFMarker", "OFMarker"):
                _yes_no(value)
                return [(key, "No")]
            if key == "InitiatorAlias":
                p.initiator_alias = value
                return []
            if key == "RDMAExtensions":
                _yes_no(value)
                return [(key, "No")]
            if key == "TaskReporting":
                return [(key, "RFC3720")]
            if key == "iSCSIProtocolLevel":
                return [(key, str(min(parse_number(value, 0, 31), 1)))]
            if key in _IRRELEVANT:
                return [(key, "Irrelevant")]
        except TextError:
            return [(key, "Reject")]
        return [(key, "NotUnderstood")]

    def _declare(self) -> list[tuple[str, str]]:
        if self._declared:
            return []
        self._declared = True
        self.params.max_recv_data_segment_length = self.settings.max_recv_data_segment_length
        return [("MaxRecvDataSegmentLength", str(self.settings.max_recv_data_segment_length))]

    def _finish_params(self) -> None:
        p = self.params
        if p.first_burst_length > p.max_burst_length:
            p.first_burst_length = p.max_burst_length
