"""A small NFS server for the portmapper client test, run inside a network namespace:
portmapper on port 111 (TCP and UDP), MOUNT and NFS v3 on free ports over an in-memory share
``/share1``, registered with the portmapper. Prints "ready" once listening; stops on SIGTERM.

Usage: python -m tests.fileshare.pmap_server
"""

from __future__ import annotations

import asyncio
import signal

from fileshare.mount import MountProgram
from fileshare.nfs import NfsProgram
from fileshare.nfs3 import Nfs3Program
from fileshare.portmap import PMAP_PORT, PortmapProgram, PortRegistry
from fileshare.server import RpcServer
from tests.fileshare.memfs import MemExports, MemFs


async def main() -> None:
    exports = MemExports()
    exports.add("/share1", MemFs("share1", 1))
    nfs, mount = NfsProgram(Nfs3Program(exports)), MountProgram(exports)
    registry = PortRegistry()
    pmap = PortmapProgram(registry)
    servers = [RpcServer([nfs], "127.0.0.1", 0), RpcServer([mount], "127.0.0.1", 0, udp=True),
               RpcServer([pmap], "127.0.0.1", PMAP_PORT, udp=True)]
    for server in servers:
        await server.start()
    registry.register(nfs.prog, nfs.versions, servers[0].port, "127.0.0.1")
    registry.register(mount.prog, mount.versions, servers[1].port, "127.0.0.1", ("tcp", "udp"))
    registry.register(pmap.prog, pmap.versions, PMAP_PORT, "127.0.0.1", ("tcp", "udp"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
