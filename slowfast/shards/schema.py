"""The shard format: one Parquet row per pre-sampled clip, fast-rate frames stored once (JPEG or raw).

DESIGN.md "Shards" is the contract; this module writes and reads it: the Arrow schema and its JSON
metadata (ShardMeta), frame encode/decode, clips -> table, table -> Parquet file.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import simplejpeg
from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1
METADATA_KEY = b"slowfast"
FrameFormat = Literal["jpeg", "raw"]

# Parquet settings: JPEG frames are already compressed, and raw frames exist to be read without a
# decode step, which a codec would bring back; so the frames column gets no codec, no dictionary and
# no statistics. The small columns get zstd.
FRAMES = "frames"
SMALL_CODEC = "zstd"
# A row group is the unit a streaming reader holds in memory: aim for ~32 MiB, at most 64 clips
# (JPEG clips of 32 frames at short side 256 are ~1 MB, so 32-64 clips; raw clips ~8 MB, so 4).
ROW_GROUP_BYTES = 32 << 20
MAX_ROW_GROUP_ROWS = 64


class ShardError(ValueError):
    """A shard, its metadata or a clip row is not what the format says; the message names which."""


class ShardMeta(BaseModel):
    """What every clip of a shard shares; stored as JSON under METADATA_KEY in the schema metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    dataset: str
    split: str
    class_names: list[str]
    T: int = Field(ge=1, description="slow pathway frames")
    alpha: int = Field(ge=1, description="frame-rate ratio fast/slow")
    tau: int = Field(ge=1, description="slow pathway temporal stride, in source frames at target_fps")
    frames_per_clip: int = Field(ge=1, description="fast frames stored per clip: alpha * T")
    target_fps: float = Field(gt=0)
    short_side: int = Field(ge=1, description="stored frames' short side, pixels")
    frame_format: FrameFormat = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    prep_hash: str = ""

    @model_validator(mode="before")
    @classmethod
    def _default_frames(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("frames_per_clip") is None and "T" in data and "alpha" in data:
            data = {**data, "frames_per_clip": int(data["T"]) * int(data["alpha"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ShardMeta:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version}: this code reads and writes "
                f"version {FORMAT_VERSION}; re-run preprocess with this version"
            )
        if self.frames_per_clip != self.alpha * self.T:
            raise ValueError(
                f"frames_per_clip must be alpha * T = {self.alpha} * {self.T} = "
                f"{self.alpha * self.T}, got {self.frames_per_clip}"
            )
        return self

    @property
    def sampling_rate(self) -> float:
        """Fast pathway stride in source frames (at target_fps): tau / alpha."""
        return self.tau / self.alpha

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardMeta:
        data = json.loads(text)
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise ShardError(
                f"shard format_version {version!r}, this reader understands {FORMAT_VERSION}; "
                "re-run preprocess with this version, or read with the version that wrote it"
            )
        return cls.model_validate(data)


def shard_schema(meta: ShardMeta) -> pa.Schema:
    """The Arrow schema of a shard with `meta`; frames are list<binary> (JPEG) or binary (raw)."""
    frames_type = pa.list_(pa.binary()) if meta.frame_format == "jpeg" else pa.binary()
    return pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("clip_index", pa.int16(), nullable=False),
            pa.field("start_sec", pa.float32(), nullable=False),
            pa.field("height", pa.int16(), nullable=False),
            pa.field("width", pa.int16(), nullable=False),
            pa.field(FRAMES, frames_type, nullable=False),
            pa.field("slow_index", pa.list_(pa.int16()), nullable=False),
        ],
        metadata={METADATA_KEY: meta.to_json().encode()},
    )


def encode_frames(frames: np.ndarray, frame_format: FrameFormat, quality: int = 90) -> list[bytes] | bytes:
    """(N, H, W, 3) uint8 RGB -> one JPEG per frame, or the raw bytes of the whole array.

    JPEG uses 4:2:0 chroma: the frames come from 4:2:0 video, so full-resolution chroma would store
    detail the source never had.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ShardError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if frame_format == "raw":
        return np.ascontiguousarray(frames).tobytes()
    if frame_format == "jpeg":
        # libjpeg-turbo reads rows by their stride: a frame whose rows are padded (PyAV aligns them)
        # is encoded in place, and only one whose pixels are not packed within a row is copied first.
        return [
            simplejpeg.encode_jpeg(
                f if f.strides[1:] == (3, 1) else np.ascontiguousarray(f),
                quality=quality,
                colorspace="RGB",
                colorsubsampling="420",
            )
            for f in frames
        ]
    raise ShardError(f"frame_format must be 'jpeg' or 'raw', got {frame_format!r}")


def decode_frames(
    cell,
    frame_format: FrameFormat,
    height: int,
    width: int,
    *,
    out: np.ndarray | None = None,
    fastdct: bool = False,
    fastupsample: bool = False,
) -> np.ndarray:
    """One row's frames cell -> (N, height, width, 3) uint8.

    jpeg: `cell` is a sequence of JPEG buffers (bytes, memoryview or uint8 arrays), decoded straight
    into `out` (allocated when None). fastdct/fastupsample default off: with libjpeg-turbo's SIMD
    DCT they buy only 2-4% each (measured, 32 frames 340x256 q90), while the fast DCT costs 1.7 dB at
    q95 and nearest-neighbour chroma upsampling puts errors of 20+ levels on colour edges.
    raw: `cell` is the bytes of the (N, H, W, 3) array; returns a read-only view, no copy.
    """
    if frame_format == "raw":
        flat = np.frombuffer(cell, dtype=np.uint8)
        frame_bytes = height * width * 3
        if frame_bytes == 0 or flat.size % frame_bytes:
            raise ShardError(f"raw frames cell of {flat.size} bytes is not a whole number of {height}x{width}x3 frames")
        return flat.reshape(-1, height, width, 3)
    if frame_format != "jpeg":
        raise ShardError(f"frame_format must be 'jpeg' or 'raw', got {frame_format!r}")
    n = len(cell)
    if out is None:
        out = np.empty((n, height, width, 3), np.uint8)
    for i, buf in enumerate(cell):
        img = simplejpeg.decode_jpeg(buf, colorspace="RGB", fastdct=fastdct, fastupsample=fastupsample, buffer=out[i])
        if img.shape != (height, width, 3):
            raise ShardError(f"JPEG frame {i} decodes to {img.shape[1]}x{img.shape[0]}, the row says {width}x{height}")
    return out


def clips_to_table(rows: Sequence[dict], meta: ShardMeta) -> pa.Table:
    """Clip dicts -> a table with the shard schema.

    Each row: video_id, label, clip_index, start_sec, slow_index (T indices into the frames), and
    frames as a uint8 (alpha*T, H, W, 3) array (encoded here per `meta`), or already encoded
    (list of JPEG bytes / raw bytes) together with height and width.
    """
    schema = shard_schema(meta)
    cols: dict[str, list] = {name: [] for name in schema.names}
    n_frames = meta.frames_per_clip
    for r in rows:
        where = f"{r.get('video_id')!r} clip {r.get('clip_index')}"
        frames = r["frames"]
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            if len(frames) != n_frames:
                raise ShardError(f"{where}: {len(frames)} frames, the shard stores alpha*T = {n_frames}")
            height, width = frames.shape[1:3]
            frames = encode_frames(frames, meta.frame_format, meta.jpeg_quality)
        else:
            height, width = r["height"], r["width"]
            count = len(frames) if meta.frame_format == "jpeg" else len(frames) // (height * width * 3)
            if count != n_frames:
                raise ShardError(f"{where}: {count} encoded frames, the shard stores alpha*T = {n_frames}")
        slow = np.asarray(r["slow_index"], dtype=np.int64)
        if slow.shape != (meta.T,) or slow.min() < 0 or slow.max() >= n_frames:
            raise ShardError(f"{where}: slow_index must be {meta.T} indices in [0, {n_frames}), got {slow.tolist()}")
        cols["video_id"].append(str(r["video_id"]))
        cols["label"].append(int(r["label"]))
        cols["clip_index"].append(int(r["clip_index"]))
        cols["start_sec"].append(float(r["start_sec"]))
        cols["height"].append(int(height))
        cols["width"].append(int(width))
        cols[FRAMES].append(frames)
        cols["slow_index"].append(slow.astype(np.int16))
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def resolve_filesystem(path: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it): `filesystem` when given, else from the URI, else local."""
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Clips per row group: about target_bytes of frames, between 1 and MAX_ROW_GROUP_ROWS."""
    per_row = table.nbytes / max(table.num_rows, 1)
    return int(min(MAX_ROW_GROUP_ROWS, max(1, target_bytes // max(per_row, 1))))


def write_shard(
    table: pa.Table, path: str, filesystem: pafs.FileSystem | None = None, row_group_size: int | None = None
) -> dict:
    """Write `table` as one Parquet shard; returns {"path", "rows", "bytes", "videos"} for the manifest.

    `path` is local or a URI (s3://...) unless `filesystem` is given. The frames column is written
    without codec, dictionary or statistics; the small columns with zstd.
    """
    if METADATA_KEY not in (table.schema.metadata or {}):
        raise ShardError(f"{path}: table has no {METADATA_KEY!r} schema metadata; build it with clips_to_table")
    fs, where = resolve_filesystem(path, filesystem)
    parent = posixpath.dirname(where)
    if parent:
        fs.create_dir(parent, recursive=True)
    small = [c for c in table.column_names if c != FRAMES]
    with fs.open_output_stream(where) as sink:
        pq.write_table(
            table,
            sink,
            row_group_size=row_group_size or row_group_rows(table),
            compression={**{c: SMALL_CODEC for c in small}, FRAMES: "NONE"},
            use_dictionary=["video_id"],
            write_statistics=small,
        )
        nbytes = sink.tell()
    videos = sorted(set(table.column("video_id").to_pylist()))
    return {"path": path, "rows": table.num_rows, "bytes": nbytes, "videos": videos}


def read_meta(path_or_schema: str | pa.Schema, filesystem: pafs.FileSystem | None = None) -> ShardMeta:
    """The ShardMeta of a shard file (footer only) or of an Arrow schema."""
    if isinstance(path_or_schema, pa.Schema):
        schema, where = path_or_schema, "schema"
    else:
        fs, where = resolve_filesystem(path_or_schema, filesystem)
        with fs.open_input_file(where) as f:
            schema = pq.read_schema(f)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(
            f"{where}: no {METADATA_KEY!r} schema metadata; not a slowfast shard "
            "(shards are written by slowfast.shards.write_shard)"
        )
    try:
        return ShardMeta.from_json(raw)
    except ShardError as e:
        raise ShardError(f"{where}: {e}") from None
    except ValueError as e:
        raise ShardError(f"{where}: bad shard metadata: {e}") from None
