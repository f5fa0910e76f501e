"""Tiny SpcDevice subclasses and helpers for the SPC tests."""

from __future__ import annotations

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.modepages import BlockDescriptor, DescriptorFormat, ModePage
from vtl.scsi.sense import Asc, DecodedSense, FieldPointer, SenseError, SenseKey, illegal_request
from vtl.scsi.spc import SpcDevice

DEVICE_NAME = "iqn.2026-11.org.example:dev"


class TapeLike(SpcDevice):
    """A sequential-access-shaped device with one page, one saveable subpage, a descriptor."""

    peripheral_type = 0x01
    removable = True
    supports_reserve6 = True

    def __init__(self, serial: str = "SN0001", device_name: str = DEVICE_NAME) -> None:
        super().__init__(vendor="VTL", product="TESTDEV", revision="0001", serial=serial,
                         device_name=device_name)
        self.loaded = True
        self.block = BlockDescriptor(density_code=0x58, number_of_blocks=0, block_length=0)
        self.header_seen: tuple[int, int] | None = None
        self.applied: list[bytes] = []
        self.test_page = ModePage(0x10, default=bytes([0x00, 0x40, 0x00, 0x00]),
                                  changeable=bytes([0x00, 0x40, 0x0F, 0x00]),
                                  validate=self._validate, apply=self.applied.append)
        self.sub_page = ModePage(0x10, 0x01, default=bytes([0x11, 0x22, 0x33, 0x44]),
                                 changeable=bytes([0xFF, 0x00, 0x00, 0x00]), saveable=True)

    def ready(self) -> None:
        if not self.loaded:
            raise SenseError(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)

    def vpd_pages(self) -> dict[int, bytes]:
        return {0xC0: b"\x01\x02"}

    def mode_pages(self) -> list[ModePage]:
        return [*super().mode_pages(), self.test_page, self.sub_page]

    def block_descriptor(self) -> BlockDescriptor | None:
        return self.block

    def apply_block_descriptor(self, desc: BlockDescriptor) -> None:
        if desc.block_length > 0x10000:
            raise illegal_request(Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte=5, in_cdb=False)
        self.block = desc

    def apply_mode_header(self, medium_type: int, device_specific: int) -> None:
        self.header_seen = (medium_type, device_specific)

    @staticmethod
    def _validate(page: bytes) -> None:
        if page[4] & 0x0F == 0x0F:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_VALUE_INVALID,
                             field=FieldPointer(4, 3, in_cdb=False))


class DiskLike(SpcDevice):
    """A direct-access-shaped device: LBA block descriptors, no reservations."""

    peripheral_type = 0x00
    descriptor_format = DescriptorFormat.SHORT_LBA

    def __init__(self) -> None:
        super().__init__(vendor="VTL", product="DISK", revision="1", serial="D1")

    def block_descriptor(self) -> BlockDescriptor | None:
        return BlockDescriptor(number_of_blocks=0x1_0000_0000, block_length=512)


def run(dev: object, cdb: bytes | bytearray, data: bytes = b"", nexus: str = "n1",
        lun: int = 0) -> ScsiResult:
    cdb = bytes(cdb)
    return dev.execute(ScsiCommand(lun=lun, cdb=cdb, data_out=data, nexus=nexus))  # type: ignore[attr-defined]


def settle(dev: object, nexus: str = "n1", lun: int = 0) -> None:
    """Consume pending unit attentions (TEST UNIT READY until it stops reporting one)."""
    for _ in range(16):
        r = run(dev, bytes(6), nexus=nexus, lun=lun)
        if r.status != ScsiStatus.CHECK_CONDITION or r.sense[2] & 0x0F != SenseKey.UNIT_ATTENTION:
            return
    raise AssertionError("unit attentions never cleared")


def sense(result: ScsiResult) -> DecodedSense:
    assert result.status == ScsiStatus.CHECK_CONDITION, result
    assert len(result.sense) == 18
    return DecodedSense.decode(result.sense)


def check(result: ScsiResult, key: int, asc: tuple[int, int], sks: bytes | None = None) -> None:
    s = sense(result)
    assert (s.key, s.asc, s.ascq) == (key, asc[0], asc[1]), s
    if sks is not None:
        assert s.sks == sks, s.sks.hex()
