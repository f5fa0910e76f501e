"""INQUIRY data: the standard data (SPC-4 6.6.2) and the VPD pages every device shares (SPC-4 7.8).

Invariants:
- Identity strings are printable ASCII (SPC-4 4.4.1), left-aligned and padded with spaces to
  their field width; a string that does not fit is a configuration error (ValueError) raised when
  the structure is built, never at command time.
- Every VPD page has the 4-byte header of SPC-4 7.8.1 (peripheral byte, page code, 2-byte page
  length) built by :func:`vpd_page`; device code supplies payloads only.
- The NAA designator is a pure function of the serial number, so it is stable across restarts.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field

STANDARD_INQUIRY_MIN_LEN = 36  # SPC-4 6.6.2: bytes 0-35 are the mandatory part
STANDARD_INQUIRY_LEN = 96  # with the vendor-specific bytes and eight version descriptors
MAX_VERSION_DESCRIPTORS = 8

_STD_HEAD = struct.Struct(">BBBBBBBB8s16s4s")
assert _STD_HEAD.size == STANDARD_INQUIRY_MIN_LEN
_VPD_HEAD = struct.Struct(">BBH")
assert _VPD_HEAD.size == 4
_DESIGNATOR_HEAD = struct.Struct(">BBBB")
assert _DESIGNATOR_HEAD.size == 4
_NAA = struct.Struct(">Q")
assert _NAA.size == 8
_RELATIVE_PORT = struct.Struct(">2xH")
assert _RELATIVE_PORT.size == 4

# IEEE company identifier used in our NAA 5 designators. It is a placeholder in the
# CID-shaped range (low nibble of the first octet 1010b, "locally assigned"), not a registered
# OUI: the appliance does not own one. Change it here if the project ever registers one.
VTL_COMPANY_ID = 0x0A5654

VERSION_SPC4 = 0x06  # SPC-4 6.6.2 table 142: VERSION 06h claims conformance to SPC-4


class PeripheralType(enum.IntEnum):
    """SPC-4 6.6.2 table 141, the device types the appliance presents."""

    DIRECT_ACCESS = 0x00
    SEQUENTIAL_ACCESS = 0x01
    MEDIUM_CHANGER = 0x08
    ENCLOSURE = 0x0D
    WELL_KNOWN_LU = 0x1E
    UNKNOWN = 0x1F


class PeripheralQualifier(enum.IntEnum):
    """SPC-4 6.6.2: 000b connected, 001b not connected now, 011b no logical unit here."""

    CONNECTED = 0
    NOT_CONNECTED = 1
    NOT_SUPPORTED = 3


class VersionDescriptor(enum.IntEnum):
    """SPC-4 6.6.2 table 144: version descriptor codes (the 'no version claimed' variants)."""

    SAM_5 = 0x00A0
    SPC_4 = 0x0460
    SBC_3 = 0x04C0
    SSC_3 = 0x0400
    SMC_3 = 0x0480
    ISCSI = 0x0960


class VpdPage(enum.IntEnum):
    """VPD page codes, SPC-4 7.8.1 table 583 (and the SBC/SSC ones devices add)."""

    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    SOFTWARE_INTERFACE_IDENTIFICATION = 0x84
    MANAGEMENT_NETWORK_ADDRESSES = 0x85
    EXTENDED_INQUIRY = 0x86
    MODE_PAGE_POLICY = 0x87
    SCSI_PORTS = 0x88
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class CodeSet(enum.IntEnum):
    """SPC-4 7.8.6.1 table 590."""

    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(enum.IntEnum):
    """SPC-4 7.8.6.1 table 591."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(enum.IntEnum):
    """SPC-4 7.8.6.1 table 592."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI_64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8


PROTOCOL_ISCSI = 0x5  # SPC-4 7.6.1 table 444: PROTOCOL IDENTIFIER for iSCSI


def ascii_field(text: str, width: int, what: str) -> bytes:
    """Left-aligned, space-padded printable ASCII (SPC-4 4.4.1); ValueError if it does not fit."""
    raw = text.encode("ascii", "strict")
    if len(raw) > width:
        raise ValueError(f"{what} {text!r} is longer than {width} bytes")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise ValueError(f"{what} {text!r} is not printable ASCII")
    return raw.ljust(width, b" ")


@dataclass(frozen=True, slots=True)
class InquiryFlags:
    """Bytes 5-7 of standard INQUIRY data (SPC-4 6.6.2 table 140).

    ``mchngr`` is the (SPC-4-obsolete, SMC-3-used) bit saying a changer is attached to this
    LU; ``cmdque`` says the LU supports command queuing (required with RESPONSE DATA FORMAT 2).
    """

    sccs: bool = False
    acc: bool = False
    tpgs: int = 0
    threepc: bool = False
    protect: bool = False
    encserv: bool = False
    multip: bool = False
    mchngr: bool = False
    cmdque: bool = True

    def encode(self) -> bytes:
        b5 = ((self.sccs << 7) | (self.acc << 6) | ((self.tpgs & 0x3) << 4)
              | (self.threepc << 3) | int(self.protect))
        b6 = (self.encserv << 6) | (self.multip << 4) | (self.mchngr << 3)
        b7 = self.cmdque << 1
        return bytes([b5, b6, b7])

    @classmethod
    def decode(cls, buf: bytes) -> "InquiryFlags":
        if len(buf) < 3:
            raise ValueError("INQUIRY flags need 3 bytes")
        b5, b6, b7 = buf[0], buf[1], buf[2]
        return cls(sccs=bool(b5 & 0x80), acc=bool(b5 & 0x40), tpgs=(b5 >> 4) & 0x3,
                   threepc=bool(b5 & 0x08), protect=bool(b5 & 0x01), encserv=bool(b6 & 0x40),
                   multip=bool(b6 & 0x10), mchngr=bool(b6 & 0x08), cmdque=bool(b7 & 0x02))


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data, SPC-4 6.6.2 table 140.

    Encodes to 36 bytes when there are no version descriptors and no vendor-specific bytes,
    else to 96 bytes (bytes 36-55 vendor specific, 58-73 version descriptors).
    """

    peripheral_type: int
    vendor: str
    product: str
    revision: str
    peripheral_qualifier: int = PeripheralQualifier.CONNECTED
    removable: bool = False
    version: int = VERSION_SPC4
    normaca: bool = False
    hisup: bool = True
    response_data_format: int = 2
    flags: InquiryFlags = field(default_factory=InquiryFlags)
    vendor_specific: bytes = b""
    version_descriptors: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ascii_field(self.vendor, 8, "vendor")
        ascii_field(self.product, 16, "product")
        ascii_field(self.revision, 4, "revision")
        if len(self.vendor_specific) > 20:
            raise ValueError("standard INQUIRY vendor-specific bytes are at most 20")
        if len(self.version_descriptors) > MAX_VERSION_DESCRIPTORS:
            raise ValueError("at most 8 version descriptors")
        if not 0 <= self.peripheral_type <= 0x1F or not 0 <= self.peripheral_qualifier <= 7:
            raise ValueError("peripheral type/qualifier out of range")

    def encode(self) -> bytes:
        extended = bool(self.version_descriptors or self.vendor_specific)
        total = STANDARD_INQUIRY_LEN if extended else STANDARD_INQUIRY_MIN_LEN
        f5, f6, f7 = self.flags.encode()
        head = _STD_HEAD.pack(
            (self.peripheral_qualifier << 5) | self.peripheral_type,
            0x80 if self.removable else 0,
            self.version,
            (self.normaca << 5) | (self.hisup << 4) | (self.response_data_format & 0x0F),
            total - 5,  # ADDITIONAL LENGTH (n-4) counts the bytes after byte 4
            f5, f6, f7,
            ascii_field(self.vendor, 8, "vendor"),
            ascii_field(self.product, 16, "product"),
            ascii_field(self.revision, 4, "revision"),
        )
        if not extended:
            return head
        tail = bytearray(STANDARD_INQUIRY_LEN - STANDARD_INQUIRY_MIN_LEN)
        tail[0:len(self.vendor_specific)] = self.vendor_specific
        for i, code in enumerate(self.version_descriptors):
            struct.pack_into(">H", tail, 58 - 36 + 2 * i, code)
        return head + bytes(tail)

    @classmethod
    def decode(cls, buf: bytes) -> "StandardInquiry":
        if len(buf) < STANDARD_INQUIRY_MIN_LEN:
            raise ValueError("standard INQUIRY data shorter than 36 bytes")
        (b0, b1, version, b3, _alen, f5, f6, f7, vendor, product,
         revision) = _STD_HEAD.unpack_from(buf)
        descriptors: list[int] = []
        vendor_specific = b""
        if len(buf) >= 74:
            vendor_specific = bytes(buf[36:56]).rstrip(b"\x00")
            for i in range(MAX_VERSION_DESCRIPTORS):
                code = int.from_bytes(buf[58 + 2 * i:60 + 2 * i], "big")
                if code:
                    descriptors.append(code)
        return cls(
            peripheral_type=b0 & 0x1F, peripheral_qualifier=b0 >> 5, removable=bool(b1 & 0x80),
            version=version, normaca=bool(b3 & 0x20), hisup=bool(b3 & 0x10),
            response_data_format=b3 & 0x0F, flags=InquiryFlags.decode(bytes([f5, f6, f7])),
            vendor=vendor.decode("ascii").rstrip(" "), product=product.decode("ascii").rstrip(" "),
            revision=revision.decode("ascii").rstrip(" "), vendor_specific=vendor_specific,
            version_descriptors=tuple(descriptors),
        )


def vpd_page(peripheral: int, page_code: int, payload: bytes) -> bytes:
    """A complete VPD page: SPC-4 7.8.1 header (2-byte PAGE LENGTH) + payload."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"VPD page 0x{page_code:02x} payload too long")
    return _VPD_HEAD.pack(peripheral & 0xFF, page_code & 0xFF, len(payload)) + payload


def supported_pages_payload(codes: list[int] | set[int] | tuple[int, ...]) -> bytes:
    """SPC-4 7.8.16: one byte per supported page code, ascending."""
    return bytes(sorted(set(codes)))


def unit_serial_payload(serial: str) -> bytes:
    """SPC-4 7.8.18: the PRODUCT SERIAL NUMBER, ASCII (the length is the page length)."""
    raw = serial.encode("ascii")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise ValueError(f"serial {serial!r} is not printable ASCII")
    return raw


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of the Device Identification VPD page (SPC-4 7.8.6.1)."""

    designator_type: int
    value: bytes
    code_set: int = CodeSet.BINARY
    association: int = Association.LOGICAL_UNIT
    protocol_identifier: int = 0
    piv: bool = False

    def __post_init__(self) -> None:
        if len(self.value) > 255:
            raise ValueError("designator longer than 255 bytes")

    def encode(self) -> bytes:
        return _DESIGNATOR_HEAD.pack(
            ((self.protocol_identifier & 0xF) << 4) | (self.code_set & 0xF),
            (self.piv << 7) | ((self.association & 0x3) << 4) | (self.designator_type & 0xF),
            0,
            len(self.value),
        ) + self.value

    @classmethod
    def decode(cls, buf: bytes) -> tuple["Designator", int]:
        """Decode one descriptor; returns it and the number of bytes consumed."""
        if len(buf) < 4:
            raise ValueError("designation descriptor header truncated")
        b0, b1, _, length = _DESIGNATOR_HEAD.unpack_from(buf)
        if len(buf) < 4 + length:
            raise ValueError("designation descriptor truncated")
        return cls(designator_type=b1 & 0xF, value=bytes(buf[4:4 + length]), code_set=b0 & 0xF,
                   association=(b1 >> 4) & 0x3, protocol_identifier=b0 >> 4,
                   piv=bool(b1 & 0x80)), 4 + length


def decode_designators(payload: bytes) -> list[Designator]:
    """All designation descriptors of a Device Identification page payload."""
    out: list[Designator] = []
    pos = 0
    while pos < len(payload):
        desc, used = Designator.decode(payload[pos:])
        out.append(desc)
        pos += used
    return out


def t10_vendor_designator(vendor: str, serial: str) -> Designator:
    """SPC-4 7.8.6.4: T10 VENDOR IDENTIFICATION (8 bytes, padded) + vendor specific (serial)."""
    value = ascii_field(vendor, 8, "vendor") + serial.encode("ascii")
    return Designator(DesignatorType.T10_VENDOR_ID, value[:255], code_set=CodeSet.ASCII)


def naa_ieee_registered(serial: str, company_id: int = VTL_COMPANY_ID) -> int:
    """SPC-4 7.8.6.6.5: NAA 5 (IEEE Registered): NAA(4) | IEEE COMPANY ID(24) | VS ID(36).

    The vendor specific identifier is the first 36 bits of SHA-256(serial): deterministic, and
    distinct for distinct serials with overwhelming probability.
    """
    digest = int.from_bytes(hashlib.sha256(serial.encode("utf-8")).digest()[:5], "big") >> 4
    return (0x5 << 60) | ((company_id & 0xFFFFFF) << 36) | (digest & ((1 << 36) - 1))


def naa_designator(serial: str, company_id: int = VTL_COMPANY_ID) -> Designator:
    return Designator(DesignatorType.NAA, _NAA.pack(naa_ieee_registered(serial, company_id)))


def scsi_name_designator(name: str, association: int = Association.TARGET_DEVICE) -> Designator:
    """SPC-4 7.8.6.11: UTF-8 SCSI name string, null-terminated, padded to a multiple of 4.

    For iSCSI the target device's name is the target IQN; a target port's name is
    "<iqn>,t,0x<tpgt>" (SPC-4 7.6.4 / RFC 7143 13.x).
    """
    raw = name.encode("utf-8") + b"\x00"
    raw += b"\x00" * (-len(raw) % 4)
    return Designator(DesignatorType.SCSI_NAME_STRING, raw, code_set=CodeSet.UTF8,
                      association=association, protocol_identifier=PROTOCOL_ISCSI, piv=True)


def relative_target_port_designator(port: int) -> Designator:
    """SPC-4 7.8.6.7: RELATIVE TARGET PORT IDENTIFIER (1 = port A)."""
    return Designator(DesignatorType.RELATIVE_TARGET_PORT, _RELATIVE_PORT.pack(port & 0xFFFF),
                      association=Association.TARGET_PORT,
                      protocol_identifier=PROTOCOL_ISCSI, piv=True)


def target_port_group_designator(group: int) -> Designator:
    """SPC-4 7.8.6.8: TARGET PORT GROUP."""
    return Designator(DesignatorType.TARGET_PORT_GROUP, _RELATIVE_PORT.pack(group & 0xFFFF),
                      association=Association.TARGET_PORT,
                      protocol_identifier=PROTOCOL_ISCSI, piv=True)


def device_identification_payload(
    *,
    vendor: str,
    serial: str,
    device_name: str = "",
    portal_group_tag: int = 1,
    relative_port: int = 1,
    port_group: int = 1,
    extra: list[bytes] | tuple[bytes, ...] = (),
) -> bytes:
    """SPC-4 7.8.6: the designators every LU reports, then the device's extra ones.

    Logical-unit association: T10 vendor ID (vendor + serial) and NAA 5 from the serial.
    With a ``device_name`` (the target IQN): SCSI name strings for the target device and the
    target port (``<iqn>,t,0x<tpgt>``). Always: relative target port and target port group.
    """
    parts = [t10_vendor_designator(vendor, serial).encode(), naa_designator(serial).encode()]
    if device_name:
        parts.append(scsi_name_designator(device_name, Association.TARGET_DEVICE).encode())
        parts.append(scsi_name_designator(f"{device_name},t,0x{portal_group_tag:04x}",
                                          Association.TARGET_PORT).encode())
    parts.append(relative_target_port_designator(relative_port).encode())
    parts.append(target_port_group_designator(port_group).encode())
    parts.extend(bytes(p) for p in extra)
    return b"".join(parts)
