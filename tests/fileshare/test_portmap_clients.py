"""Real clients find MOUNT and NFS through our portmapper on port 111 (no ports in the URL).

libnfs always asks the portmapper on port 111 (portmap v2 GETPORT over IPv4), so the server
(tests/fileshare/pmap_server.py) runs in a network namespace of this test's own, with only
loopback, where port 111 is free; the clients run there with ``ip netns exec``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.nfs import Unavailable, netns
from fileshare.portmap import IPPROTO_TCP, PMAP_PROG, pack_getport
from fileshare.rpc import decode_reply, encode_call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    if shutil.which("nfs-cp") is None:
        pytest.skip("libnfs-utils not installed")
    try:
        with netns(f"vtltest-pmap-{os.getpid()}") as ns:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                                     "tests.fileshare.pmap_server"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if line.strip() != b"ready":
                    proc.kill()
                    raise AssertionError(f"server did not start: {proc.communicate()[1]!r}")
                yield ns
            finally:
                proc.terminate()
                _, err = proc.communicate(timeout=30)
                assert proc.returncode == 0, err.decode(errors="replace")
    except Unavailable as exc:
        pytest.skip(str(exc))


def _in(ns: str, *cmd: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], input=data, capture_output=True,
                          timeout=120)


def test_libnfs_finds_mount_and_nfs_through_the_portmapper(namespace: str,
                                                           tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    url = "nfs://127.0.0.1/share1/a.bin?version=3"
    cp = _in(namespace, "nfs-cp", str(src), url)
    assert cp.returncode == 0, cp.stderr
    ls = _in(namespace, "nfs-ls", "nfs://127.0.0.1/share1?version=3")
    assert ls.returncode == 0 and ls.stdout.split()[-1] == b"a.bin", ls
    cat = _in(namespace, "nfs-cat", url)
    assert cat.returncode == 0 and cat.stdout == data


def test_unknown_export_through_the_portmapper(namespace: str) -> None:
    ls = _in(namespace, "nfs-ls", "nfs://127.0.0.1/nope?version=3")
    assert ls.returncode != 0 and b"MNT3ERR_NOENT" in ls.stderr


def test_getport_over_udp_in_the_namespace(namespace: str) -> None:
    # A raw GETPORT datagram to port 111, sent from inside the namespace.
    script = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
              "s.settimeout(10);s.sendto(sys.stdin.buffer.read(),('127.0.0.1',111));"
              "sys.stdout.buffer.write(s.recv(65536))")
    call = encode_call(9, PMAP_PROG, 2, 3, pack_getport(100005, 3, IPPROTO_TCP))
    out = _in(namespace, sys.executable, "-c", script, data=call)
    assert out.returncode == 0, out.stderr
    reply = decode_reply(out.stdout)
    assert reply.xid == 9 and int.from_bytes(reply.body, "big") not in (0, 111)
