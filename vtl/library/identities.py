"""Device identities the library presents: INQUIRY strings, serial numbers, DVCID identifiers.

Backup applications choose their driver by the INQUIRY vendor/product strings (FACTS.md), so the
changer type is a named profile. Serial numbers are derived from the gateway id with a hash, so
they are stable across restarts and differ between appliances; a drive's serial is the one its
VPD page 0x80 reports and the one its READ ELEMENT STATUS descriptor carries (SMC-3 data transfer
element descriptor, DVCID), which is how software maps data transfer elements to tape targets.

Invariant: pure data and pure functions (no I/O).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vtl.scsi.inquiry import Designator, t10_vendor_designator

SERIAL_LEN = 10


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """One INQUIRY profile: the type name users pick and the strings the device reports."""

    type_name: str
    vendor: str  # T10 vendor identification, at most 8 ASCII characters
    product: str  # at most 16
    revision: str  # at most 4

    def __post_init__(self) -> None:
        for value, limit in ((self.vendor, 8), (self.product, 16), (self.revision, 4)):
            if len(value) > limit or not value.isascii():
                raise ValueError(f"{self.type_name}: {value!r} longer than {limit} ASCII chars")


CHANGER_TYPES: dict[str, DeviceIdentity] = {
    ident.type_name: ident
    for ident in (
        DeviceIdentity("STK-L700", "STK", "L700", "0105"),
        DeviceIdentity("AWS-Gateway-VTL", "AWS", "Gateway-VTL", "0100"),
        DeviceIdentity("IBM-03584L32-0402", "IBM", "03584L32", "0402"),
    )
}
DEFAULT_CHANGER_TYPE = "STK-L700"

#: The only drive type offered (LTO-5, density code 0x58).
DRIVE_IDENTITY = DeviceIdentity("IBM-ULT3580-TD5", "IBM", "ULT3580-TD5", "G9N1")  # as drive.py reports
LTO5_DENSITY_CODE = 0x58


def changer_identity(type_name: str | None) -> DeviceIdentity:
    """The profile for ``type_name`` (None = default); KeyError names the valid choices."""
    name = type_name or DEFAULT_CHANGER_TYPE
    try:
        return CHANGER_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown changer type {name!r}; choose one of "
                       + ", ".join(CHANGER_TYPES)) from None


def _digits(seed: str) -> str:
    value = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")
    return f"{value % 10**SERIAL_LEN:0{SERIAL_LEN}d}"


def changer_serial(gateway_id: str) -> str:
    """Stable 10-digit serial number of the media changer of ``gateway_id``."""
    return _digits(f"{gateway_id.lower()}/mediachanger")


def drive_serial(gateway_id: str, index: int) -> str:
    """Stable 10-digit serial number of drive ``index`` (0-based) of ``gateway_id``."""
    return _digits(f"{gateway_id.lower()}/tapedrive/{index}")


def drive_device_identifier(serial: str) -> Designator:
    """What the changer reports for a drive when DVCID=1 (SMC-3 data transfer element descriptor): exactly the T10
    vendor ID designator of the drive's own VPD page 0x83 (SPC-4 7.8.6.4: vendor, 8 bytes blank
    padded, then the serial number), so software can match data transfer elements to targets."""
    return t10_vendor_designator(DRIVE_IDENTITY.vendor, serial)
