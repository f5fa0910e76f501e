"""The system libiscsi, driven through ctypes, as a second real initiator: CRC32C header digests
and 1 MiB writes that need unsolicited data plus R2T bursts (libiscsi offers MaxBurstLength
256 KiB and one outstanding R2T)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

from vtl.iscsi.target import IscsiTarget, Targets

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import ServerThread

pytestmark = pytest.mark.integration

TARGET = "iqn.2026-11.org.vtl.e2e:ctypes"
HEADER_DIGEST_CRC32C = 3  # enum iscsi_header_digest
SESSION_NORMAL = 2  # enum iscsi_session_type
SCSI_STATUS_GOOD = 0


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("iscsi")
    if name is None:
        pytest.skip("libiscsi is not installed")
    lib = ctypes.CDLL(name)
    lib.iscsi_create_context.restype = ctypes.c_void_p
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    lib.iscsi_set_targetname.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_set_header_digest.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_full_connect_sync.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.iscsi_get_error.argtypes = [ctypes.c_void_p]
    lib.iscsi_write10_sync.restype = ctypes.POINTER(ctypes.c_int)  # task->status is first
    lib.iscsi_write10_sync.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                                       ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int]
    lib.iscsi_read10_sync.restype = ctypes.POINTER(ctypes.c_int)
    lib.iscsi_read10_sync.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
    lib.iscsi_logout_sync.argtypes = [ctypes.c_void_p]
    lib.iscsi_destroy_context.argtypes = [ctypes.c_void_p]
    return lib


def test_header_digest_and_r2t_writes_with_libiscsi() -> None:
    lib = _lib()
    disk = FakeDisk(8192)
    reg = Targets()
    reg.add(IscsiTarget(TARGET, disk))
    payload = os.urandom(1024 * 1024)
    with ServerThread(reg) as st:
        ctx = lib.iscsi_create_context(b"iqn.2026-11.org.vtl.e2e:libiscsi-ctypes")
        assert ctx
        try:
            lib.iscsi_set_targetname(ctx, TARGET.encode())
            lib.iscsi_set_session_type(ctx, SESSION_NORMAL)
            assert lib.iscsi_set_header_digest(ctx, HEADER_DIGEST_CRC32C) == 0
            rc = lib.iscsi_full_connect_sync(ctx, st.portal.encode(), 0)
            assert rc == 0, lib.iscsi_get_error(ctx)
            for lba in (0, 2048, 4096):
                task = lib.iscsi_write10_sync(ctx, 0, lba, payload, len(payload), BLOCK,
                                              0, 0, 0, 0, 0)
                assert task and task[0] == SCSI_STATUS_GOOD, lib.iscsi_get_error(ctx)
                lib.scsi_free_scsi_task(ctypes.cast(task, ctypes.c_void_p))
                assert bytes(disk.data[lba * BLOCK:lba * BLOCK + len(payload)]) == payload
            task = lib.iscsi_read10_sync(ctx, 0, 2048, len(payload), BLOCK, 0, 0, 0, 0, 0)
            assert task and task[0] == SCSI_STATUS_GOOD, lib.iscsi_get_error(ctx)
            lib.scsi_free_scsi_task(ctypes.cast(task, ctypes.c_void_p))
            lib.iscsi_logout_sync(ctx)
        finally:
            lib.iscsi_destroy_context(ctx)
    write_cmds = [c for c in disk.commands if c.cdb[0] == 0x2A]
    assert len(write_cmds) == 3 and all(len(c.data_out) == len(payload) for c in write_cmds)
