"""Exceptions of the iSCSI layer, each carrying the protocol's own error code as data.

Invariant: nothing but these types escapes the codecs and state machines of ``vtl.iscsi`` on bad
input. ``PduError`` carries the Reject reason (RFC 7143 11.17.1) the connection answers with;
``LoginError`` carries the Status-Class/Status-Detail of a Login Response (RFC 7143 11.13.5).
"""

from __future__ import annotations

import enum


class RejectReason(enum.IntEnum):
    """RFC 7143 11.17.1 Reject reason codes."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class LoginStatus(enum.IntEnum):
    """RFC 7143 11.13.5 Login Response Status-Class << 8 | Status-Detail."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class IscsiError(Exception):
    """Base of every error the iSCSI layer raises on bad input."""


class PduError(IscsiError):
    """A PDU that cannot be accepted.

    ``fatal``: the byte stream can no longer be trusted (bad header digest, impossible length),
    so the connection must be dropped (RFC 7143 7.8, ERL 0). ``bhs`` is the offending header when
    known, returned as the data segment of the Reject PDU (RFC 7143 11.17).
    """

    def __init__(self, reason: RejectReason, message: str, *, fatal: bool = False,
                 bhs: bytes = b"") -> None:
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal
        self.bhs = bhs


class DigestError(PduError):
    """A header or data digest mismatch (RFC 7143 7.8, 11.17.1)."""


class TextError(IscsiError):
    """Malformed key=value text (RFC 7143 6.1)."""


class LoginError(IscsiError):
    """A login that fails with the given status (RFC 7143 11.13.5)."""

    def __init__(self, status: LoginStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
