"""Cloud tier figure for ``make bench``: upload throughput of a tape to an S3-compatible server.

A 2 GiB cartridge (default; ``--cloud-mb``) of 256 MiB segments is written with the cartridge
API, then uploaded twice to a moto server on 127.0.0.1 (started here, stopped by PID):

- ours: ``vtl.cloud.tapestore.upload_tape`` through ``S3Store`` (CRC32C of each segment, then a
  multipart upload with parallel 16 MiB parts, then the manifest), as the archive job does;
- plain boto3: ``client.upload_file`` of the same segment files with a TransferConfig of the same
  part size and concurrency (no checksum pass, no manifest).

The ratio ours/plain says what the pipeline costs over the bare SDK. MB/s are 10^6 bytes/s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MiB = 1 << 20
PART = 16 * MiB
CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _write_tape(path: Path, size_mb: int) -> int:
    from vtl.library.cartridge import Cartridge

    base = os.urandom(MiB)
    cart = Cartridge.create(path, "BENCH01", 100 << 30)
    for i in range(size_mb):
        cart.write_block(i.to_bytes(8, "big") + base[8:])
    cart.close()
    return sum(p.stat().st_size for p in path.glob("seg-*.dat"))


def measure(size_mb: int = 2048, log=print) -> dict[str, float]:
    """Return {"ours_mbps", "plain_mbps", "ratio", "bytes"}."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    from boto3.s3.transfer import TransferConfig

    from vtl.cloud import tapestore as ts
    from vtl.cloud.s3 import S3Store

    port = _free_port()
    proc = _start_moto(port)
    url = f"http://127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory(prefix="vtl-bench-cloud-") as tmp:
            tape = Path(tmp) / "BENCH01"
            log(f"cloud: writing a {size_mb} MiB tape")
            nbytes = _write_tape(tape, size_mb)
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            store = S3Store(bucket, "ours/", endpoint_url=url, part_size=PART,
                            max_concurrency=CONCURRENCY)
            store.ensure_bucket()
            log("cloud: ours (upload_tape via S3Store)")
            t0 = time.perf_counter()
            manifest = ts.upload_tape(store, "BENCH01", tape, final=True)
            ours = time.perf_counter() - t0
            assert manifest.complete
            client = boto3.session.Session().client("s3", endpoint_url=url)
            cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                                 max_concurrency=CONCURRENCY)
            log("cloud: plain boto3 upload_file")
            t0 = time.perf_counter()
            for seg in sorted(tape.glob("seg-*.dat")):
                client.upload_file(str(seg), bucket, f"plain/{seg.name}", Config=cfg)
            plain = time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait(10)
    return {"bytes": nbytes, "ours_mbps": nbytes / ours / 1e6, "plain_mbps": nbytes / plain / 1e6,
            "ratio": plain / ours}


def render(r: dict[str, float]) -> str:
    return ("| cloud upload of a {:.0f} MiB tape to moto_server (S3 over HTTP) | ours {:.1f} MB/s "
            "| plain boto3 multipart {:.1f} MB/s | ratio {:.2f} |").format(
        r["bytes"] / MiB, r["ours_mbps"], r["plain_mbps"], r["ratio"])


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    print(render(measure(size, log=lambda m: print(m, file=sys.stderr))))
