"""Export a volume snapshot as an EBS snapshot through the EBS direct APIs.

``export_snapshot(chunks, manifest, client)`` walks the manifest and writes every non-zero
512 KiB EBS block with ``put_snapshot_block`` (SHA-256 checksum, base64), between
``start_snapshot`` and ``complete_snapshot``. A 1 MiB chunk is two EBS blocks; all-zero
chunks and all-zero halves are skipped (an EBS snapshot reads zeros where no block was put).
The EBS volume size is the snapshot's size rounded up to whole GiB, as EBS requires.

The client is a boto3 ``ebs`` client (or anything with the same three methods), made by
:func:`ebs_client`; boto3 is imported only there. The export is not resumable: a failure
leaves an EBS snapshot in the "error" state on the AWS side (EBS never completes it), and a new
export starts over.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

from volumes.chunks import ChunkStore, Manifest, is_zero

EBS_BLOCK = 512 * 1024
GIB = 1024 ** 3


def ebs_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 ``ebs`` client (credentials: the standard AWS chain)."""
    import boto3

    return boto3.client("ebs", region_name=region or "us-east-1", endpoint_url=endpoint_url)


def export_snapshot(chunks: ChunkStore, manifest: Manifest, client: Any, *,
                    description: str = "",
                    progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write ``manifest`` as a new EBS snapshot; returns {ebs_snapshot_id, blocks, volume_size_gib}."""
    size_gib = max(1, -(-manifest.size_bytes // GIB))
    started = client.start_snapshot(VolumeSize=size_gib,
                                    Description=(description or manifest.description
                                                 or f"vtl {manifest.snapshot_id}")[:255])
    ebs_id = started["SnapshotId"]
    per_chunk = manifest.chunk_bytes // EBS_BLOCK
    blocks = 0
    total = len(manifest.chunks)
    for index, ref in enumerate(manifest.chunks):
        if should_stop is not None and should_stop():
            raise InterruptedError("export stopped")
        if ref is not None:
            data = chunks.get(ref, manifest.chunk_length(index))
            for part in range(per_chunk):
                block = data[part * EBS_BLOCK:(part + 1) * EBS_BLOCK]
                if not block or is_zero(block):
                    continue
                if len(block) < EBS_BLOCK:
                    block = block + bytes(EBS_BLOCK - len(block))
                digest = base64.b64encode(hashlib.sha256(block).digest()).decode()
                client.put_snapshot_block(SnapshotId=ebs_id,
                                          BlockIndex=index * per_chunk + part,
                                          BlockData=block, DataLength=EBS_BLOCK,
                                          Checksum=digest, ChecksumAlgorithm="SHA256")
                blocks += 1
        if progress is not None:
            progress(index + 1, total)
    client.complete_snapshot(SnapshotId=ebs_id, ChangedBlocksCount=blocks)
    return {"ebs_snapshot_id": ebs_id, "blocks": blocks, "volume_size_gib": size_gib}
