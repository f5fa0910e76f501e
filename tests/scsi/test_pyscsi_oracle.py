"""Cross-check against an independent decoder: pyscsi's unmarshalling of our parameter data."""

from __future__ import annotations

import pytest

from .devices import DEVICE_NAME, TapeLike, run, settle

inquiry_mod = pytest.importorskip("pyscsi.pyscsi.scsi_cdb_inquiry")
modesense_mod = pytest.importorskip("pyscsi.pyscsi.scsi_cdb_modesense6")


def test_pyscsi_reads_standard_inquiry() -> None:
    data = bytes(run(TapeLike(), bytes([0x12, 0, 0, 0, 255, 0])).data_in)
    std = inquiry_mod.Inquiry.unmarshall_datain(data)
    assert (std["peripheral_device_type"], std["rmb"], std["version"]) == (1, 1, 6)
    assert (std["response_data_format"], std["hisup"], std["cmdque"]) == (2, 1, 1)
    assert std["t10_vendor_identification"] == b"VTL     "
    assert std["product_identification"] == b"TESTDEV         "
    assert std["product_revision_level"] == b"0001"


def test_pyscsi_reads_device_identification() -> None:
    data = bytes(run(TapeLike(), bytes([0x12, 1, 0x83, 0, 255, 0])).data_in)
    page = inquiry_mod.Inquiry.unmarshall_datain(data, evpd=1)
    descs = page["designator_descriptors"]
    assert [(d["designator_type"], d["association"]) for d in descs] == [
        (1, 0), (3, 0), (8, 2), (8, 1), (4, 1), (5, 1)]
    assert descs[0]["designator"]["vendor_specific_id"] == b"SN0001"
    assert descs[1]["designator"]["naa"] == 5
    assert descs[1]["designator"]["ieee_company_id"] == 0x0A5654
    assert descs[2]["designator"]["scsi_name_string"].rstrip(b"\x00") == DEVICE_NAME.encode()
    assert descs[4]["designator"]["relative_port"] == 1


def test_pyscsi_reads_control_mode_page() -> None:
    dev = TapeLike()
    settle(dev)
    data = bytes(run(dev, bytes([0x1A, 0x08, 0x0A, 0, 255, 0])).data_in)
    parsed = modesense_mod.ModeSense6.unmarshall_datain(data)
    (page,) = parsed["mode_pages"]
    assert page["page_code"] == 0x0A and page["gltsd"] == 1 and page["d_sense"] == 0
    assert page["queue_algorithm_modifier"] == 1 and page["busy_timeout_period"] == 0xFFFF
