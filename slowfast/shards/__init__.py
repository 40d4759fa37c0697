"""Clip shards: the Parquet format (schema), and the reader that turns rows into [slow, fast] tensors.

The format names import eagerly; the reader (which needs torch) loads on first use, so a
preprocessing worker that only writes shards does not pay for importing torch.
"""

from slowfast.shards.schema import (
    FORMAT_VERSION,
    METADATA_KEY,
    ShardError,
    ShardMeta,
    clips_to_table,
    decode_frames,
    encode_frames,
    read_meta,
    shard_schema,
    write_shard,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "ShardError",
    "ShardMeta",
    "clips_to_table",
    "decode_frames",
    "encode_frames",
    "read_meta",
    "shard_schema",
    "write_shard",
    "ClipTransform",
    "iter_clips",
]


def __getattr__(name):
    if name in ("ClipTransform", "iter_clips"):
        from slowfast.shards import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'slowfast.shards' has no attribute {name!r}")
