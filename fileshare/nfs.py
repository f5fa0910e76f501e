"""RPC program 100003 (NFS) serving several versions from separate program objects.

:class:`~fileshare.server.RpcServer` takes one program object per program number; NFS v3
(:mod:`fileshare.nfs3`) and NFS v4 (:mod:`fileshare.nfs4`) are separate objects, so the service
registers one :class:`NfsProgram` holding both. It routes a call by version and answers any other
version PROG_MISMATCH with the lowest and highest versions it holds (RFC 5531 9).

Invariant: the versions of the programs given do not overlap and all are program 100003.
"""

from __future__ import annotations

from fileshare.rpc import AcceptStat, RpcCall, RpcError, RpcProgram

NFS_PROGRAM = 100003


class NfsProgram:
    """Program 100003 dispatching by version to the version programs given."""

    prog = NFS_PROGRAM

    def __init__(self, *programs: RpcProgram) -> None:
        by_version: dict[int, RpcProgram] = {}
        for program in programs:
            if program.prog != NFS_PROGRAM:
                raise ValueError(f"program {program.prog} is not NFS")
            for vers in program.versions:
                if vers in by_version:
                    raise ValueError(f"NFS version {vers} given twice")
                by_version[vers] = program
        if not by_version:
            raise ValueError("no NFS version to serve")
        self._by_version = by_version
        self.versions: tuple[int, ...] = tuple(sorted(by_version))

    def handle(self, call: RpcCall) -> bytes:
        program = self._by_version.get(call.vers)
        if program is None:
            raise RpcError(AcceptStat.PROG_MISMATCH, low=self.versions[0], high=self.versions[-1])
        return program.handle(call)
