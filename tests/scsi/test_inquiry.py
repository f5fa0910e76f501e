"""INQUIRY: standard data and VPD pages, byte for byte (SPC-4 6.6, 7.8)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtl.scsi.command import ScsiStatus
from vtl.scsi.inquiry import (
    VTL_COMPANY_ID,
    Association,
    Designator,
    DesignatorType,
    InquiryFlags,
    StandardInquiry,
    decode_designators,
    naa_ieee_registered,
    scsi_name_designator,
)
from vtl.scsi.sense import SenseKey

from .devices import DEVICE_NAME, TapeLike, check, run

ILLEGAL = SenseKey.ILLEGAL_REQUEST

STD_96 = (
    bytes([0x01, 0x80, 0x06, 0x12, 91, 0x00, 0x00, 0x02])  # type 1, RMB, SPC-4, HiSup|RDF2, CmdQue
    + b"VTL     " + b"TESTDEV         " + b"0001"
    + bytes(20) + bytes(2)  # vendor specific 36-55, byte 56-57
    + bytes.fromhex("00a0" "0460" "0960") + bytes(10)  # SAM-5, SPC-4, iSCSI, 5 empty slots
    + bytes(22)
)


def inquiry(evpd: int, page: int, alloc: int = 0xFFFF) -> bytes:
    return bytes([0x12, evpd, page, alloc >> 8, alloc & 0xFF, 0])


def test_standard_inquiry_bytes() -> None:
    dev = TapeLike()
    r = run(dev, inquiry(0, 0))
    assert r.status == ScsiStatus.GOOD
    assert len(STD_96) == 96
    assert bytes(r.data_in) == STD_96


def test_standard_inquiry_is_exempt_from_unit_attention_and_truncated() -> None:
    dev = TapeLike()
    r = run(dev, inquiry(0, 0, alloc=5))
    assert bytes(r.data_in) == STD_96[:5]
    # the POWER ON UA is still pending afterwards
    check(run(dev, bytes(6)), SenseKey.UNIT_ATTENTION, (0x29, 0x00))


def test_standard_inquiry_roundtrip() -> None:
    std = StandardInquiry.decode(STD_96)
    assert std.vendor == "VTL" and std.product == "TESTDEV" and std.revision == "0001"
    assert std.removable and std.flags == InquiryFlags(cmdque=True)
    assert std.version_descriptors == (0x00A0, 0x0460, 0x0960)
    assert std.encode() == STD_96


def test_minimal_standard_inquiry_is_36_bytes() -> None:
    data = StandardInquiry(peripheral_type=8, vendor="STK", product="L700", revision="0105",
                           flags=InquiryFlags(mchngr=True, cmdque=False)).encode()
    assert len(data) == 36 and data[4] == 31 and data[6] == 0x08 and data[7] == 0


@pytest.mark.parametrize("kw", [{"vendor": "TOO-LONG-V"}, {"product": "x" * 17},
                                {"revision": "12345"}, {"vendor": "caf\u00e9"}])
def test_bad_identity_is_a_construction_error(kw: dict[str, str]) -> None:
    base = {"peripheral_type": 1, "vendor": "V", "product": "P", "revision": "R"}
    with pytest.raises(ValueError):
        StandardInquiry(**{**base, **kw})  # type: ignore[arg-type]


def test_vpd_supported_pages() -> None:
    r = run(TapeLike(), inquiry(1, 0x00))
    assert bytes(r.data_in) == bytes([0x01, 0x00, 0x00, 0x04, 0x00, 0x80, 0x83, 0xC0])


def test_vpd_unit_serial_number() -> None:
    r = run(TapeLike(), inquiry(1, 0x80))
    assert bytes(r.data_in) == bytes([0x01, 0x80, 0x00, 0x06]) + b"SN0001"


def test_vpd_subclass_page() -> None:
    r = run(TapeLike(), inquiry(1, 0xC0))
    assert bytes(r.data_in) == bytes([0x01, 0xC0, 0x00, 0x02, 0x01, 0x02])


def _naa(serial: str) -> bytes:
    vs = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:5], "big") >> 4
    return ((0x5 << 60) | (0x0A5654 << 36) | vs).to_bytes(8, "big")


def test_vpd_device_identification_bytes() -> None:
    r = run(TapeLike(), inquiry(1, 0x83))
    name = DEVICE_NAME.encode()  # 27 bytes -> 28 with the NUL
    port = DEVICE_NAME.encode() + b",t,0x0001"  # 36 bytes -> 40 with NUL and padding
    expected_payload = (
        bytes([0x02, 0x01, 0x00, 14]) + b"VTL     SN0001"  # ASCII, LU, T10 vendor ID
        + bytes([0x01, 0x03, 0x00, 8]) + _naa("SN0001")  # binary, LU, NAA
        + bytes([0x53, 0xA8, 0x00, 28]) + name + b"\x00"  # iSCSI UTF-8, PIV, target dev, name
        + bytes([0x53, 0x98, 0x00, 40]) + port + b"\x00" * 4  # target port name
        + bytes([0x51, 0x94, 0x00, 4, 0, 0, 0, 1])  # relative target port 1
        + bytes([0x51, 0x95, 0x00, 4, 0, 0, 0, 1])  # target port group 1
    )
    assert len(expected_payload) == 122
    assert bytes(r.data_in) == bytes([0x01, 0x83, 0x00, 122]) + expected_payload


def test_device_identification_without_device_name() -> None:
    r = run(TapeLike(device_name=""), inquiry(1, 0x83))
    types = [d.designator_type for d in decode_designators(bytes(r.data_in)[4:])]
    assert types == [DesignatorType.T10_VENDOR_ID, DesignatorType.NAA,
                     DesignatorType.RELATIVE_TARGET_PORT, DesignatorType.TARGET_PORT_GROUP]


def test_naa_is_deterministic_and_ours() -> None:
    a, b = naa_ieee_registered("SN0001"), naa_ieee_registered("SN0002")
    assert a == naa_ieee_registered("SN0001") and a != b
    assert a >> 60 == 5 and (a >> 36) & 0xFFFFFF == VTL_COMPANY_ID


@given(st.text(min_size=1, max_size=100))
def test_scsi_name_designator_is_padded_and_terminated(name: str) -> None:
    d = scsi_name_designator(name, Association.TARGET_PORT)
    assert len(d.value) % 4 == 0 and b"\x00" in d.value
    assert d.value.rstrip(b"\x00") == name.encode().rstrip(b"\x00")
    decoded, used = Designator.decode(d.encode() + b"trailing")
    assert decoded == d and used == 4 + len(d.value)


def test_vpd_allocation_length_truncates() -> None:
    r = run(TapeLike(), inquiry(1, 0x83, alloc=4))
    assert bytes(r.data_in) == bytes([0x01, 0x83, 0x00, 122])


def test_page_code_without_evpd_is_invalid_field_byte_2() -> None:
    check(run(TapeLike(), inquiry(0, 0x80)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0x00, 0x02]))


def test_unsupported_vpd_page_is_invalid_field_byte_2() -> None:
    check(run(TapeLike(), inquiry(1, 0x99)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0x00, 0x02]))


def test_cmddt_bit_is_reserved() -> None:
    check(run(TapeLike(), inquiry(2, 0)), ILLEGAL, (0x24, 0x00), bytes([0xC9, 0x00, 0x01]))


def test_short_inquiry_cdb() -> None:
    check(run(TapeLike(), b"\x12\x00\x00"), ILLEGAL, (0x24, 0x00))


@given(st.binary(max_size=120))
def test_standard_inquiry_decoder_raises_only_value_error(buf: bytes) -> None:
    try:
        std = StandardInquiry.decode(buf)
    except ValueError:
        return
    assert len(buf) >= 36 and std.peripheral_type == buf[0] & 0x1F


def test_standard_inquiry_decode_byte_by_byte_prefixes() -> None:
    for n in range(36):
        with pytest.raises(ValueError):
            StandardInquiry.decode(STD_96[:n])
    assert StandardInquiry.decode(STD_96 + b"trailing").encode() == STD_96
