"""The real NFS clients the tests drive: libnfs-utils (``nfs-ls``, ``nfs-cp``, ``nfs-cat``) and the
PyPI client ``nfs-rs``. URLs name the ports explicitly, so no portmapper is needed.

libnfs 4 URL syntax: ``nfs://host/export/path?version=3&nfsport=P&mountport=Q``.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

LIBNFS_TOOLS = ("nfs-ls", "nfs-cp", "nfs-cat")
TOOL_TIMEOUT = 300.0


def need_libnfs() -> None:
    missing = [t for t in LIBNFS_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"libnfs-utils not installed ({', '.join(missing)})")


def libnfs_url(nfs_port: int, mount_port: int, export: str, path: str = "",
               host: str = "127.0.0.1") -> str:
    full = export.rstrip("/") + ("/" + path.lstrip("/") if path else "")
    return f"nfs://{host}{full}?version=3&nfsport={nfs_port}&mountport={mount_port}"


def run_tool(*args: str, timeout: float = TOOL_TIMEOUT, check: bool = True,
             ) -> subprocess.CompletedProcess[bytes]:
    """Run an nfs-* tool; ``check`` raises with its stderr when it fails."""
    proc = subprocess.run(list(args), capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


def nfs_ls(url: str) -> list[str]:
    """Names listed by ``nfs-ls`` (last column), '.' and '..' left out."""
    out = run_tool("nfs-ls", url).stdout.decode()
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return [n for n in names if n not in (".", "..")]


def nfs_rs_connect(nfs_port: int, mount_port: int, export: str, **kw: Any) -> Any:
    """An ``nfs_rs.Client`` on NFS v3 (skips when the package is missing)."""
    nfs_rs = pytest.importorskip("nfs_rs")
    return nfs_rs.Client.connect(f"nfs://127.0.0.1{export}?version=3", nfs_port=nfs_port,
                                 mount_port=mount_port, connect_timeout=10,
                                 operation_timeout=60, **kw)


class RawNfs:
    """NFS v3 calls built by hand over one TCP connection (AUTH_SYS), for what no client exposes
    (e.g. the write verifier)."""

    def __init__(self, port: int, uid: int = 1000, gid: int = 1000,
                 host: str = "127.0.0.1") -> None:
        import socket

        from fileshare.rpc import AuthSys, RecordReassembler

        self.sock = socket.create_connection((host, port), timeout=60)
        self.cred = AuthSys(0, "vtl-test", uid, gid, ())
        self.records = RecordReassembler()
        self.xid = 0

    def call(self, proc: int, args: Any) -> tuple[int, Any]:
        """Send ``args`` (an nfs3types argument object); return (nfsstat3, Unpacker of the rest)."""
        from fileshare.rpc import AcceptStat, decode_reply, encode_call, frame
        from fileshare.xdr import Packer, Unpacker

        p = Packer()
        args.encode(p)
        self.xid += 1
        self.sock.sendall(frame(encode_call(self.xid, 100003, 3, proc, p.getvalue(), self.cred)))
        while (rec := self.records.next_record()) is None:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.records.receive_data(data)
        reply = decode_reply(rec)
        assert reply.xid == self.xid and reply.accept_stat == AcceptStat.SUCCESS, reply
        u = Unpacker(reply.body)
        return u.uint(), u

    def close(self) -> None:
        self.sock.close()
