"""Shard rows -> uint8 clips, slow-pathway indices and labels, for Ray Data and for a plain local loop.

ClipTransform is the one place where a batch of shard rows is decoded and augmented (train) or cut into
test views (eval). It stops at uint8 frames in the layout the network runs in; the slow pathway and the
normalisation are made on the device by slowfast.train.clip_inputs. Ray Data calls it from map_batches
(batch_format "pyarrow" or "numpy"); iter_clips streams shard files through it without Ray.
"""

from __future__ import annotations

import secrets
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from slowfast.shards.schema import FRAMES, ShardError, ShardMeta, decode_frames, read_meta, resolve_filesystem
from slowfast.video import transforms

Mode = Literal["train", "eval"]
COLUMNS = ("video_id", "label", "clip_index", "height", "width", FRAMES, "slow_index")


def _binary_cells(arr: pa.Array) -> list[np.ndarray]:
    """Zero-copy uint8 views of each value of a binary / large_binary array."""
    offsets_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, offsets_type)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return [data[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def _list_cells(arr: pa.Array, leaf) -> list:
    """Per row, the items of a list / large_list array, with `leaf` applied to the flat child array."""
    offsets = arr.offsets.to_numpy()
    items = leaf(arr.values)
    return [items[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def _arrow_rows(table: pa.Table | pa.RecordBatch, frame_format: str) -> dict[str, list | np.ndarray]:
    """The columns the transform reads, frames as zero-copy views into the Arrow buffers."""
    cols = {}
    for name in COLUMNS:
        if name not in table.column_names:
            raise ShardError(
                f"batch has no {name!r} column (columns: {table.column_names}); "
                "read shards with all of " + ", ".join(COLUMNS)
            )
        col = table.column(name)
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        if name == FRAMES and frame_format == "jpeg":
            cols[name] = [cell for ch in chunks for cell in _list_cells(ch, _binary_cells)]
        elif name == FRAMES:
            cols[name] = [cell for ch in chunks for cell in _binary_cells(ch)]
        elif name == "slow_index":
            cols[name] = [cell for ch in chunks for cell in _list_cells(ch, lambda v: v.to_numpy())]
        elif name == "video_id":
            cols[name] = col.to_pylist()
        else:
            cols[name] = np.concatenate([ch.to_numpy() for ch in chunks]) if chunks else np.empty(0)
    return cols


def _numpy_rows(batch: dict) -> dict[str, list | np.ndarray]:
    missing = [c for c in COLUMNS if c not in batch]
    if missing:
        raise ShardError(f"batch has no {missing} column(s) (columns: {list(batch)})")
    return {
        name: (list(batch[name]) if name in (FRAMES, "slow_index", "video_id") else np.asarray(batch[name]))
        for name in COLUMNS
    }


class _BufferPool:
    """Memory for output batches, reused once every consumer has let go of it.

    Fresh memory costs a page fault per page, each zeroed by the kernel: 6 ms per 32-frame 224x224
    uint8 clip (4.8 MB) where the allocator maps new pages, measured on a busy 2-core machine, a quarter
    of the whole transform. A buffer is reused only when its reference
    count shows that no array view, tensor or Arrow buffer made from it is alive, so a consumer that
    keeps batches (a prefetch queue, Ray's block builder) just gets fresh memory.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._bufs: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        for i in range(len(self._bufs)):
            # 2 = the list's reference + getrefcount's argument: nobody else holds it.
            if self._bufs[i].nbytes == nbytes and sys.getrefcount(self._bufs[i]) == 2:
                return self._bufs[i]
        buf = np.empty(nbytes, np.uint8)
        if self.keep:
            self._bufs = (self._bufs + [buf])[-self.keep :]
        return buf


class ClipTransform:
    """A batch of shard rows -> {"fast", "slow_index", "label", "video_id", "clip_index", "spatial_index"},
    plus "region" in train mode.

    fast: uint8 (B, alpha*T, H, W, 3), each clip's frames as decoded (T, H, W, C): permuted to
    (B, 3, alpha*T, H, W) it is already a channels_last_3d tensor, the layout the network runs in. Eval:
    H = W = crop, the test views. Train: each clip's crop box as stored, not yet resized, in the top-left
    corner of a region_side x region_side frame; region int16 (B, 4) holds (height, width, flip, crop):
    slowfast.train.clip_inputs mirrors the box where flip is set and resizes it to crop x crop on the
    device (transforms.resize_regions). The loader's CPU then only decodes JPEG and copies the box: the
    resize cost as much as a third of the JPEG decodes (32 frames 224x224 per clip).
    slow_index: int64 (B, T), the slow pathway's frames as indices into fast's time axis (the shard's
    slow_index; every row of a preprocessing run holds the same one). The slow pathway is not copied
    here: slowfast.train.clip_inputs takes it from the fast frames on the device and normalises both
    there, so the frames cross Ray and the host-to-device copy once, as uint8. label int64; video_id
    object; clip_index int16; spatial_index int8 (-1 for a random train crop, else the uniform-crop
    index). In eval mode each row yields `spatial_crops` samples (B = rows * crops).

    Train randomness. With an integer `epoch`, a clip's scale, crop and flip are drawn from
    (seed, epoch, video_id, clip_index): reproducible, and independent of batching, worker count and
    order, so Ray Data's nondeterministic batch boundaries do not matter. Each epoch then needs its
    own number: construct the transform per epoch (Ray Data: a fresh map_batches with
    fn_constructor_kwargs={"epoch": e}) or call set_epoch(e). The default, epoch=None, is the safe
    one for a dataset that Ray re-executes every epoch with the same arguments: draws come from a
    stream seeded with fresh OS entropy (and `seed`) the first time a process calls the transform,
    so crops never repeat across epochs, but they are not reproducible.

    The "fast" array of a batch is recycled through _BufferPool (reuse_buffers=False turns that off);
    the other columns are fresh arrays. An instance runs one call at a time (as a map_batches actor or
    task does): its scratch buffers are not thread-safe.
    """

    def __init__(
        self,
        meta: ShardMeta,
        mode: Mode = "train",
        crop: int = 224,
        jitter: tuple[int, int] | None = None,
        seed: int = 0,
        epoch: int | None = None,
        spatial_crops: int = 3,
        reuse_buffers: bool = True,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if spatial_crops not in (1, 3):
            raise ValueError(f"spatial_crops must be 1 or 3, got {spatial_crops}")
        self.meta = meta
        self.mode = mode
        self.crop = crop
        self.jitter = tuple(jitter) if jitter is not None else transforms.jitter_range(crop)
        if not self.jitter[0] <= self.jitter[1]:
            raise ValueError(f"jitter must be (min, max) with min <= max, got {self.jitter}")
        self.seed = seed
        self.epoch = epoch
        self.spatial_crops = spatial_crops
        self.reuse_buffers = reuse_buffers
        self.region_side = transforms.region_side(meta.short_side, crop, self.jitter)
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._stream: np.random.Generator | None = None
        self._scratch = np.empty(0, np.uint8)
        self._pool = _BufferPool(keep=2 if self.reuse_buffers else 0)

    def __getstate__(self):
        # The entropy stream and the buffers stay in the process that made them.
        return {k: v for k, v in self.__dict__.items() if k not in ("_stream", "_scratch", "_pool")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_state()

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    @property
    def views_per_clip(self) -> int:
        return self.spatial_crops if self.mode == "eval" else 1

    def _rng(self, video_id: str, clip_index: int) -> np.random.Generator:
        if self.epoch is None:
            if self._stream is None:
                self._stream = np.random.default_rng([self.seed, secrets.randbits(64)])
            return self._stream
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(video_id.encode()), int(clip_index)])

    def _scratch_frames(self, n: int, height: int, width: int) -> np.ndarray:
        """uint8 (n, height, width, 3) in a scratch buffer reused from call to call."""
        need = n * height * width * 3
        if self._scratch.size < need:
            self._scratch = np.empty(need, np.uint8)
        return self._scratch[:need].reshape(n, height, width, 3)

    def _decode(self, cell, height: int, width: int) -> np.ndarray:
        """JPEG frames -> uint8 (N, H, W, 3) in the scratch buffer."""
        return decode_frames(cell, "jpeg", height, width, out=self._scratch_frames(len(cell), height, width))

    def _decode_box(self, cell, height: int, width: int, box: transforms.CropBox, out: np.ndarray) -> None:
        """JPEG frames -> their crop box, into out (N, box height, box width, 3). One frame at a time through
        a one-frame scratch, so the copy reads what the decoder has just written, still in cache: about 0.9
        of the JPEG-decode bound against about 0.8 for decoding the whole clip first (measured, 340x256)."""
        frame = self._scratch_frames(1, height, width)
        for i, buf in enumerate(cell):
            decode_frames([buf], "jpeg", height, width, out=frame)
            out[i] = frame[0, box.y : box.y + box.height, box.x : box.x + box.width]

    def _clip(
        self, cell, height: int, width: int, rng: np.random.Generator | None, fast: np.ndarray, region: np.ndarray
    ) -> None:
        """Decode one clip; train: its crop box into fast[0] and (height, width, flip, crop) into region[0];
        eval: each of its views into fast[v]."""
        jpeg = self.meta.frame_format == "jpeg"
        if rng is not None:
            box, _ = transforms.random_crop_box(height, width, self.crop, self.jitter, rng)
            flip = bool(rng.random() < 0.5)  # the draws train_view makes, in its order
            h, w = box.height, box.width
            if max(h, w) <= self.region_side:
                if jpeg:
                    self._decode_box(cell, height, width, box, fast[0, :, :h, :w])
                else:
                    fast[0, :, :h, :w] = cell[:, box.y : box.y + h, box.x : box.x + w]
                fast[0, :, h:] = 0  # the rest of the square: zeros, not what a recycled buffer held
                fast[0, :, :h, w:] = 0
                region[0] = (h, w, flip, self.crop)
            else:  # a frame stored above the shard's short side (no shipped path writes one): resize here
                frames = self._decode(cell, height, width) if jpeg else cell
                fast[0] = 0
                fast[0, :, : self.crop, : self.crop] = transforms.resized_crop(frames, box, self.crop, flip)
                region[0] = (self.crop, self.crop, False, self.crop)
            return
        frames = self._decode(cell, height, width) if jpeg else cell
        for v, view in enumerate(transforms.eval_views(frames, self.crop, self.spatial_crops)):
            fast[v] = view

    def __call__(self, batch: pa.Table | pa.RecordBatch | dict) -> dict[str, np.ndarray]:
        if isinstance(batch, (pa.Table, pa.RecordBatch)):
            cols = _arrow_rows(batch, self.meta.frame_format)
        else:
            cols = _numpy_rows(batch)
        rows, views, meta = len(cols["label"]), self.views_per_clip, self.meta
        side = self.region_side if self.mode == "train" else self.crop
        shape = (rows * views, meta.frames_per_clip, side, side, 3)
        fast = self._pool.take(int(np.prod(shape))).reshape(shape)
        region = np.empty((rows * views, 4), np.int16)
        slow_index = np.empty((rows * views, meta.T), np.int64)
        spatial = np.full(rows * views, -1, np.int8)
        for r in range(rows):
            cell, height, width = cols[FRAMES][r], int(cols["height"][r]), int(cols["width"][r])
            if meta.frame_format == "raw":
                cell = decode_frames(cell, "raw", height, width)
            index = np.asarray(cols["slow_index"][r])
            if len(cell) != meta.frames_per_clip or len(index) != meta.T:
                raise ShardError(
                    f"{cols['video_id'][r]} clip {cols['clip_index'][r]}: {len(cell)} frames and "
                    f"{len(index)} slow indices, the shard metadata says "
                    f"{meta.frames_per_clip} and {meta.T}"
                )
            rng = self._rng(str(cols["video_id"][r]), int(cols["clip_index"][r])) if self.mode == "train" else None
            rows_out = slice(r * views, (r + 1) * views)
            self._clip(cell, height, width, rng, fast[rows_out], region[rows_out])
            slow_index[rows_out] = index
            if self.mode == "eval":
                spatial[rows_out] = (1,) if views == 1 else (0, 1, 2)
        out = {
            "fast": fast,
            "slow_index": slow_index,
            "label": np.repeat(np.asarray(cols["label"], np.int64), views),
            "video_id": np.repeat(np.asarray(cols["video_id"], dtype=object), views),
            "clip_index": np.repeat(np.asarray(cols["clip_index"], np.int16), views),
            "spatial_index": spatial,
        }
        if self.mode == "train":
            out["region"] = region
        return out


def _shard_tables(
    paths: Sequence, filesystem: pafs.FileSystem | None, rng: np.random.Generator | None, read_rows: int
) -> Iterator[pa.Table]:
    """Stream shard files row group by row group (file and row-group order shuffled when rng is given)."""
    order = list(range(len(paths)))
    if rng is not None:
        rng.shuffle(order)
    for i in order:
        entry = paths[i]
        path, skip = (entry, None) if isinstance(entry, str) else (entry[0], set(entry[1]) or None)
        fs, where = resolve_filesystem(path, filesystem)
        with fs.open_input_file(where) as f:
            pf = pq.ParquetFile(f)
            groups = list(range(pf.num_row_groups))
            if rng is not None:
                rng.shuffle(groups)
            for g in groups:
                for rb in pf.iter_batches(batch_size=read_rows, row_groups=[g], columns=list(COLUMNS)):
                    table = pa.Table.from_batches([rb])
                    if skip:
                        table = table.filter(pc.invert(pc.is_in(table.column("video_id"), pa.array(sorted(skip)))))
                    if table.num_rows:
                        yield table


def iter_clips(
    paths: Iterable,
    *,
    mode: Mode,
    batch_size: int,
    crop: int = 224,
    meta: ShardMeta | None = None,
    filesystem: pafs.FileSystem | None = None,
    shuffle: bool = False,
    shuffle_buffer: int = 256,
    seed: int = 0,
    epoch: int | None = None,
    jitter: tuple[int, int] | None = None,
    spatial_crops: int = 3,
    drop_last: bool = False,
    views: Sequence[int] | None = None,
) -> Iterator[dict]:
    """Local loader: shard files -> batches of torch tensors {"fast", "slow_index", "label", "clip_index",
    "spatial_index"} plus "video_id" (list of str); the same dict Ray Data's path yields. Feed it to the
    network through slowfast.train.clip_inputs (uint8 frames in; normalised [slow, fast] out).

    `paths`: shard paths or URIs, or (path, video ids to skip) pairs as DatasetState.readable()
    returns them. `batch_size` counts clips; an eval batch holds batch_size * spatial_crops samples.
    shuffle: file order, row-group order, and clips within a window of `shuffle_buffer` clips.
    Shuffle and train crops are drawn from (seed, epoch) when epoch is an int (pass the epoch
    number), and are fresh on every call when it is None (see ClipTransform). Row groups are read
    one at a time, so memory stays at about one row group plus one window. views: only the clips whose
    clip_index is listed are read (sampling.choose_views picks them), filtered before any JPEG decode.
    """
    paths = list(paths)
    if not paths:
        return
    first = paths[0] if isinstance(paths[0], str) else paths[0][0]
    meta = meta or read_meta(first, filesystem)
    for entry in paths[1:]:
        path = entry if isinstance(entry, str) else entry[0]
        other = read_meta(path, filesystem)
        if (other.T, other.alpha, other.frame_format) != (meta.T, meta.alpha, meta.frame_format):
            raise ShardError(
                f"{path}: T={other.T} alpha={other.alpha} {other.frame_format} frames, but "
                f"{first} has T={meta.T} alpha={meta.alpha} {meta.frame_format}; "
                "read shards of one preprocessing run together"
            )
    transform = ClipTransform(meta, mode, crop, jitter=jitter, seed=seed, epoch=epoch, spatial_crops=spatial_crops)
    rng = np.random.default_rng([seed, epoch if epoch is not None else secrets.randbits(64)]) if shuffle else None
    window = max(shuffle_buffer, batch_size) if shuffle else batch_size

    def emit(table: pa.Table) -> dict:
        out = transform(table)
        video_id = out.pop("video_id").tolist()
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch["video_id"] = video_id
        return batch

    pending: list[pa.Table] = []
    held = 0
    keep = pa.array(sorted(set(views)), pa.int16()) if views is not None else None
    for table in _shard_tables(paths, filesystem, rng, read_rows=batch_size):
        if keep is not None:
            table = table.filter(pc.is_in(table.column("clip_index"), keep))
            if not table.num_rows:
                continue
        pending.append(table)
        held += table.num_rows
        if held < window:
            continue
        buf = pa.concat_tables(pending)
        if rng is not None:
            buf = buf.take(rng.permutation(buf.num_rows))
        full = buf.num_rows // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield emit(buf.slice(start, batch_size))
        pending, held = [buf.slice(full)], buf.num_rows - full
    if held and pending:
        buf = pa.concat_tables(pending)
        if rng is not None:
            buf = buf.take(rng.permutation(buf.num_rows))
        for start in range(0, buf.num_rows, batch_size):
            part = buf.slice(start, batch_size)
            if part.num_rows == batch_size or not drop_last:
                yield emit(part)
