"""Shard format and reader: real Parquet files written to tmp_path, real JPEG codec, and Ray Data's
own batch conversion for the "numpy" batch format."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slowfast.shards import (
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
from slowfast.shards.reader import ClipTransform, iter_clips
from slowfast.train import clip_inputs
from slowfast.video import transforms

T, ALPHA, CROP = 2, 4, 32
SLOW_INDEX = np.linspace(0, ALPHA * T - 1, T).astype(np.int16)  # [0, 7]


def make_meta(frame_format="jpeg", **kw):
    fields = dict(
        dataset="toy",
        split="train",
        class_names=["a", "b", "c"],
        T=T,
        alpha=ALPHA,
        tau=8,
        target_fps=30.0,
        short_side=48,
        frame_format=frame_format,
        jpeg_quality=90,
        prep_hash="abc123",
    )
    return ShardMeta(**{**fields, **kw})


def smooth_clip(n, height, width, seed=0):
    """Smooth moving colour gradients with low-frequency ripples: what decoded video mostly looks like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = []
    for t in range(n):
        chans = [
            128
            + 80
            * np.sin(2 * np.pi * (x + 2 * t) / (width * (1.5 + c)) + phase[c])
            * np.cos(2 * np.pi * y / (height * (2 + c)))
            + 20 * (y / height)
            for c in range(3)
        ]
        frames.append(np.stack(chans, -1))
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def clip_rows(n_videos=3, clips=2, height=48, width=64, seed=0):
    rows = []
    for v in range(n_videos):
        for c in range(clips):
            rows.append(
                dict(
                    video_id=f"vid{seed + v:03d}_000010_000020",
                    label=v % 3,
                    clip_index=c,
                    start_sec=1.5 * c,
                    frames=smooth_clip(ALPHA * T, height, width, seed=seed + 10 * v + c),
                    slow_index=SLOW_INDEX,
                )
            )
    return rows


def write(tmp_path, frame_format="jpeg", name="part-0000.parquet", **kw):
    meta = make_meta(frame_format)
    rows = clip_rows(**kw)
    entry = write_shard(clips_to_table(rows, meta), str(tmp_path / name))
    return meta, rows, entry


def psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


# --- format -------------------------------------------------------------------------------------


def test_meta_json_round_trip_and_derived_fields():
    meta = make_meta()
    assert meta.frames_per_clip == ALPHA * T and meta.format_version == FORMAT_VERSION
    assert meta.sampling_rate == 2.0
    assert ShardMeta.from_json(meta.to_json()) == meta
    with pytest.raises(ValueError, match="alpha \\* T"):
        make_meta(frames_per_clip=7)
    newer = meta.model_dump() | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(ShardError, match="format_version"):
        ShardMeta.from_json(json.dumps(newer))


def test_schema_columns_types_and_metadata():
    for fmt, frames_type in [("jpeg", pa.list_(pa.binary())), ("raw", pa.binary())]:
        schema = shard_schema(make_meta(fmt))
        assert schema.names == [
            "video_id",
            "label",
            "clip_index",
            "start_sec",
            "height",
            "width",
            "frames",
            "slow_index",
        ]
        assert [schema.field(n).type for n in schema.names] == [
            pa.string(),
            pa.int32(),
            pa.int16(),
            pa.float32(),
            pa.int16(),
            pa.int16(),
            frames_type,
            pa.list_(pa.int16()),
        ]
        assert not isinstance(schema.field("frames").type, pa.ExtensionType)
        assert read_meta(schema) == make_meta(fmt)
        assert METADATA_KEY in schema.metadata


def test_raw_round_trip_is_exact(tmp_path):
    meta, rows, entry = write(tmp_path, "raw")
    table = pq.read_table(entry["path"])
    assert table.num_rows == len(rows) == entry["rows"]
    for i, row in enumerate(rows):
        cell = table.column("frames")[i].as_py()
        h, w = table.column("height")[i].as_py(), table.column("width")[i].as_py()
        np.testing.assert_array_equal(decode_frames(cell, "raw", h, w), row["frames"])
        assert table.column("slow_index")[i].as_py() == SLOW_INDEX.tolist()
        assert table.column("video_id")[i].as_py() == row["video_id"]
        assert table.column("label")[i].as_py() == row["label"]


def test_jpeg_round_trip_q90_is_above_35_db(tmp_path):
    meta, rows, entry = write(tmp_path, "jpeg", height=144, width=192)
    table = pq.read_table(entry["path"])
    for i, row in enumerate(rows):
        decoded = decode_frames(table.column("frames")[i].as_py(), "jpeg", 144, 192)
        assert decoded.shape == row["frames"].shape
        assert psnr(decoded, row["frames"]) > 35


def test_fast_jpeg_decode_options_are_not_visibly_wrong():
    frames = smooth_clip(2, 144, 192)
    encoded = encode_frames(frames, "jpeg", quality=90)
    accurate = decode_frames(encoded, "jpeg", 144, 192)
    for fastdct, fastupsample in [(True, False), (False, True), (True, True)]:
        fast = decode_frames(encoded, "jpeg", 144, 192, fastdct=fastdct, fastupsample=fastupsample)
        assert psnr(fast, accurate) > 38 and psnr(fast, frames) > 34


def test_frames_with_padded_rows_or_unpacked_pixels_encode_as_their_packed_copy():
    frames = smooth_clip(2, 144, 200)
    padded = frames[:, :, :192]  # rows longer than the image, as PyAV's aligned frames are
    turned = np.rot90(smooth_clip(2, 192, 144), axes=(1, 2))  # pixels not packed within a row
    for view in (padded, turned):
        assert not view.flags["C_CONTIGUOUS"]
        assert encode_frames(view, "jpeg") == encode_frames(np.ascontiguousarray(view), "jpeg")
        assert encode_frames(view, "raw") == np.ascontiguousarray(view).tobytes()


def test_decode_rejects_frames_of_the_wrong_size():
    encoded = encode_frames(smooth_clip(1, 48, 64), "jpeg")
    with pytest.raises(ShardError, match="decodes to 64x48"):
        decode_frames(encoded, "jpeg", 48, 80)
    with pytest.raises(ShardError, match="whole number"):
        decode_frames(b"\0" * 100, "raw", 4, 4)


def test_frames_column_is_stored_uncompressed_plain_binary(tmp_path):
    for fmt in ("jpeg", "raw"):
        _, _, entry = write(tmp_path, fmt, name=f"{fmt}.parquet")
        pf = pq.ParquetFile(entry["path"])
        assert pa.types.is_binary(pf.schema_arrow.field("frames").type) or pf.schema_arrow.field(
            "frames"
        ).type == pa.list_(pa.binary())
        for g in range(pf.metadata.num_row_groups):
            rg = pf.metadata.row_group(g)
            columns = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
            frames = [c for p, c in columns.items() if p.startswith("frames")]
            assert len(frames) == 1
            assert frames[0].compression == "UNCOMPRESSED"
            assert not any("DICTIONARY" in e for e in frames[0].encodings)
            assert not frames[0].is_stats_set
            for path in ("video_id", "label", "clip_index", "start_sec"):
                assert columns[path].compression == "ZSTD"
        assert read_meta(entry["path"]) == make_meta(fmt)


def test_row_groups_stream_tens_of_jpeg_clips_and_few_raw_clips(tmp_path):
    meta = make_meta("jpeg")
    rows = clip_rows(n_videos=1, clips=1)
    many = clips_to_table([dict(r, clip_index=i) for i in range(150) for r in rows], meta)
    pf = pq.ParquetFile(write_shard(many, str(tmp_path / "many.parquet"))["path"])
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)] == [64, 64, 22]
    # Raw clips of 32 frames at 256x340 are 8 MB: a 32 MiB row group holds 3-4 of them.
    big = make_meta("raw", T=8, alpha=4)
    raw_row = dict(
        video_id="v",
        label=0,
        clip_index=0,
        start_sec=0.0,
        height=256,
        width=340,
        frames=np.zeros((32, 256, 340, 3), np.uint8).tobytes(),
        slow_index=np.arange(8) * 4,
    )
    pf = pq.ParquetFile(write_shard(clips_to_table([raw_row] * 5, big), str(tmp_path / "raw.parquet"))["path"])
    assert pf.metadata.row_group(0).num_rows in (3, 4)


def test_write_shard_returns_the_manifest_entry(tmp_path):
    _, rows, entry = write(tmp_path, name="sub/dir/part-0001.parquet")
    assert entry["rows"] == len(rows)
    assert entry["bytes"] == (tmp_path / "sub/dir/part-0001.parquet").stat().st_size
    assert entry["videos"] == sorted({r["video_id"] for r in rows})


def test_clips_to_table_rejects_bad_rows():
    meta = make_meta()
    row = clip_rows(1, 1)[0]
    with pytest.raises(ShardError, match="7 frames"):
        clips_to_table([dict(row, frames=row["frames"][:7])], meta)
    with pytest.raises(ShardError, match="slow_index"):
        clips_to_table([dict(row, slow_index=[0, 8])], meta)


def test_read_meta_of_a_plain_parquet_file_says_it_is_not_a_shard(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ShardError, match="not a slowfast shard"):
        read_meta(str(tmp_path / "plain.parquet"))


# --- reader -------------------------------------------------------------------------------------


def test_train_batch_shapes_dtypes_and_labels(tmp_path):
    meta, rows, entry = write(tmp_path)
    transform = ClipTransform(meta, "train", CROP)
    out = transform(pq.read_table(entry["path"]))
    n, side = len(rows), transform.region_side
    assert set(out) == {"fast", "region", "slow_index", "label", "video_id", "clip_index", "spatial_index"}
    # Each clip's crop box, not yet resized (the device does that: see test_loader_inputs.py).
    assert out["fast"].shape == (n, ALPHA * T, side, side, 3) and out["fast"].dtype == np.uint8
    assert out["region"].dtype == np.int16 and out["region"].shape == (n, 4) and (out["region"][:, 3] == CROP).all()
    assert out["slow_index"].dtype == np.int64 and (out["slow_index"] == SLOW_INDEX).all()
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [r["label"] for r in rows]
    assert out["video_id"].dtype == object and out["video_id"].tolist() == [r["video_id"] for r in rows]
    assert out["clip_index"].dtype == np.int16 and out["clip_index"].tolist() == [r["clip_index"] for r in rows]
    assert out["spatial_index"].dtype == np.int8 and (out["spatial_index"] == -1).all()
    # Frames as decoded, channels last: the smooth clips span most of [0, 255] in every channel.
    assert (out["fast"].reshape(-1, 3).min(0) < 60).all() and (out["fast"].reshape(-1, 3).max(0) > 180).all()


def test_fast_frames_read_as_channels_last_3d_clips_without_a_copy(tmp_path):
    meta, rows, entry = write(tmp_path)
    fast = torch.from_numpy(ClipTransform(meta, "eval", CROP, spatial_crops=1)(pq.read_table(entry["path"]))["fast"])
    clips = fast.permute(0, 4, 1, 2, 3)
    assert clips.shape == (len(rows), 3, ALPHA * T, CROP, CROP)
    assert clips.is_contiguous(memory_format=torch.channels_last_3d)
    assert clips.contiguous(memory_format=torch.channels_last_3d).data_ptr() == fast.data_ptr()


def test_eval_yields_three_views_per_clip(tmp_path):
    meta, rows, entry = write(tmp_path)
    out = ClipTransform(meta, "eval", CROP)(pq.read_table(entry["path"]))
    n = 3 * len(rows)
    assert out["fast"].shape == (n, ALPHA * T, CROP, CROP, 3) and out["slow_index"].shape == (n, T)
    assert out["spatial_index"].tolist() == [0, 1, 2] * len(rows)
    assert out["label"].tolist() == [r["label"] for r in rows for _ in range(3)]
    assert out["video_id"].tolist() == [r["video_id"] for r in rows for _ in range(3)]
    # The three views are different crops of the same clip, and match the transforms module.
    expected = transforms.eval_views(rows[0]["frames"], CROP)
    for v in range(3):
        np.testing.assert_allclose(out["fast"][v], expected[v], atol=6)  # JPEG vs source frames, in levels
    single = ClipTransform(meta, "eval", CROP, spatial_crops=1)(pq.read_table(entry["path"]))
    np.testing.assert_array_equal(single["fast"], out["fast"][1::3])


def test_raw_shards_give_the_source_pixels(tmp_path):
    meta, rows, entry = write(tmp_path, "raw")
    table = pq.read_table(entry["path"])
    out = ClipTransform(meta, "eval", CROP)(table)
    expected = transforms.eval_views(rows[1]["frames"], CROP)
    for v in range(3):
        np.testing.assert_array_equal(out["fast"][3 + v], expected[v])
    train = ClipTransform(meta, "train", CROP, seed=5, epoch=0)(table)
    jpeg_meta, _, jpeg_entry = write(tmp_path, "jpeg", name="jpeg.parquet")
    train_jpeg = ClipTransform(jpeg_meta, "train", CROP, seed=5, epoch=0)(pq.read_table(jpeg_entry["path"]))
    # Same crops (keyed by video and clip, not by format); pixels differ only by JPEG error (levels).
    assert np.abs(train["fast"].astype(np.int16) - train_jpeg["fast"]).mean() < 3


def test_numpy_batch_format_from_ray_gives_the_same_output(tmp_path):
    from ray.data.block import BlockAccessor  # the conversion map_batches(batch_format="numpy") uses

    for fmt in ("jpeg", "raw"):
        meta, _, entry = write(tmp_path, fmt, name=f"{fmt}.parquet")
        table = pq.read_table(entry["path"])
        as_numpy = BlockAccessor.for_block(table).to_batch_format("numpy")
        assert as_numpy["frames"].dtype == object
        for mode in ("train", "eval"):
            a = ClipTransform(meta, mode, CROP, seed=1, epoch=0)(table)
            b = ClipTransform(meta, mode, CROP, seed=1, epoch=0)(as_numpy)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_train_crops_are_reproducible_per_seed_and_epoch_and_independent_of_batching(tmp_path):
    meta, rows, entry = write(tmp_path)
    table = pq.read_table(entry["path"])
    first = ClipTransform(meta, "train", CROP, seed=7, epoch=0)(table)["fast"].copy()
    again = ClipTransform(meta, "train", CROP, seed=7, epoch=0)(table)["fast"]
    np.testing.assert_array_equal(first, again)
    one_by_one = ClipTransform(meta, "train", CROP, seed=7, epoch=0)
    for i in range(len(rows)):
        np.testing.assert_array_equal(one_by_one(table.slice(i, 1))["fast"][0], first[i])
    next_epoch = ClipTransform(meta, "train", CROP, seed=7, epoch=1)(table)["fast"]
    other_seed = ClipTransform(meta, "train", CROP, seed=8, epoch=0)(table)["fast"]
    for other in (next_epoch, other_seed):
        differs = [not np.array_equal(first[i], other[i]) for i in range(len(rows))]
        assert sum(differs) >= len(rows) - 1
    # set_epoch moves an existing transform on, as constructing one for that epoch would.
    moved = ClipTransform(meta, "train", CROP, seed=7, epoch=0)
    moved.set_epoch(1)
    np.testing.assert_array_equal(moved(table)["fast"], next_epoch)


def test_without_an_epoch_every_call_draws_new_crops(tmp_path):
    meta, rows, entry = write(tmp_path)
    table = pq.read_table(entry["path"])
    t = ClipTransform(meta, "train", CROP, epoch=None)
    first = t(table)["fast"].copy()
    second = t(table)["fast"]
    other = ClipTransform(meta, "train", CROP, epoch=None)(table)["fast"]
    assert not np.array_equal(first, second) and not np.array_equal(first, other)


def test_transform_survives_pickling_as_ray_ships_it(tmp_path):
    meta, _, entry = write(tmp_path)
    table = pq.read_table(entry["path"])
    t = ClipTransform(meta, "train", CROP, seed=3, epoch=2)
    expected = t(table)["fast"].copy()
    clone = pickle.loads(pickle.dumps(t))
    np.testing.assert_array_equal(clone(table)["fast"], expected)


def test_clip_inputs_takes_the_slow_pathway_from_the_fast_frames_and_normalises_both(tmp_path):
    meta, rows, entry = write(tmp_path)
    out = ClipTransform(meta, "train", CROP, seed=4, epoch=0)(pq.read_table(entry["path"]))
    batch = {k: torch.from_numpy(v) for k, v in out.items() if k != "video_id"}
    boxes = out["region"][:, :2]
    assert (boxes < out["fast"].shape[2]).any() and out["region"][:, 2].any()  # boxes to resize, some mirrored
    out["fast"] = transforms.resize_regions(batch["fast"], batch["region"]).numpy()  # the frames as cropped
    for fmt in (torch.channels_last_3d, torch.contiguous_format):
        slow, fast = clip_inputs(batch, fmt)
        assert slow.dtype == fast.dtype == torch.float32
        assert slow.shape == (len(rows), 3, T, CROP, CROP) and fast.shape == (len(rows), 3, ALPHA * T, CROP, CROP)
        assert slow.is_contiguous(memory_format=fmt) and fast.is_contiguous(memory_format=fmt)
        for i in range(len(rows)):
            np.testing.assert_array_equal(fast[i].numpy(), transforms.normalize(out["fast"][i]))
            np.testing.assert_array_equal(slow[i].numpy(), transforms.normalize(out["fast"][i][SLOW_INDEX]))
    # Each row's own indices: a row whose slow_index differs gets its own frames.
    batch["slow_index"] = batch["slow_index"].clone()
    batch["slow_index"][1] = torch.tensor([3, 4])
    slow, _ = clip_inputs(batch, torch.channels_last_3d)
    np.testing.assert_array_equal(slow[1].numpy(), transforms.normalize(out["fast"][1][[3, 4]]))
    np.testing.assert_array_equal(slow[0].numpy(), transforms.normalize(out["fast"][0][SLOW_INDEX]))


def test_output_memory_is_reused_only_after_the_consumer_lets_go(tmp_path):
    meta, _, entry = write(tmp_path)
    table = pq.read_table(entry["path"])
    t = ClipTransform(meta, "train", CROP, epoch=None)
    held = torch.from_numpy(t(table)["fast"])  # a consumer keeps a tensor of batch 1
    kept = held.clone()
    second = t(table)
    third = t(table)
    torch.testing.assert_close(held, kept)  # never overwritten while held
    assert not np.shares_memory(second["fast"], held.numpy())
    assert not np.shares_memory(third["fast"], held.numpy())
    address = second["fast"].__array_interface__["data"][0]
    del second
    fourth = t(table)  # batch 2 was released: its memory comes back
    assert fourth["fast"].__array_interface__["data"][0] == address
    del held, kept, third, fourth


def test_iter_clips_streams_every_clip_in_batches(tmp_path):
    meta, rows_a, a = write(tmp_path, name="a.parquet", n_videos=3, clips=2)
    _, rows_b, b = write(tmp_path, name="b.parquet", n_videos=2, clips=2, seed=100)
    paths = [a["path"], b["path"]]
    batches = list(iter_clips(paths, mode="train", batch_size=4, crop=CROP))
    assert [len(x["label"]) for x in batches] == [4, 4, 2]
    first = batches[0]
    assert isinstance(first["fast"], torch.Tensor) and first["fast"].dtype == torch.uint8
    side = transforms.region_side(meta.short_side, CROP, transforms.jitter_range(CROP))
    assert first["fast"].shape == (4, ALPHA * T, side, side, 3) and first["slow_index"].shape == (4, T)
    assert first["region"].shape == (4, 4)
    assert first["label"].dtype == torch.int64
    labels = torch.cat([x["label"] for x in batches]).tolist()
    assert labels == [r["label"] for r in rows_a + rows_b]
    assert [v for x in batches for v in x["video_id"]] == [r["video_id"] for r in rows_a + rows_b]
    assert [len(x["label"]) for x in iter_clips(paths, mode="train", batch_size=4, crop=CROP, drop_last=True)] == [4, 4]
    evals = list(iter_clips(paths, mode="eval", batch_size=4, crop=CROP))
    assert sum(len(x["label"]) for x in evals) == 3 * 10
    assert evals[0]["spatial_index"].tolist() == [0, 1, 2] * 4


def test_iter_clips_reads_only_the_chosen_views(tmp_path):
    _, rows, entry = write(tmp_path, n_videos=2, clips=3)
    batches = list(iter_clips([entry["path"]], mode="eval", batch_size=4, crop=CROP, spatial_crops=1, views=[0, 2]))
    got = [(v, int(c)) for x in batches for v, c in zip(x["video_id"], x["clip_index"], strict=True)]
    assert got == [(r["video_id"], r["clip_index"]) for r in rows if r["clip_index"] in (0, 2)]
    assert list(iter_clips([entry["path"]], mode="eval", batch_size=4, crop=CROP, views=[7])) == []


def test_iter_clips_shuffles_reproducibly_and_skips_videos(tmp_path):
    _, rows_a, a = write(tmp_path, name="a.parquet", n_videos=4, clips=3)
    _, rows_b, b = write(tmp_path, name="b.parquet", n_videos=4, clips=3, seed=100)
    paths = [a["path"], b["path"]]

    def order(**kw):
        return [
            (v, int(c))
            for x in iter_clips(paths, mode="train", batch_size=5, crop=CROP, **kw)
            for v, c in zip(x["video_id"], x["clip_index"], strict=True)
        ]

    plain = order()
    shuffled = order(shuffle=True, seed=1, epoch=0, shuffle_buffer=8)
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    assert order(shuffle=True, seed=1, epoch=0, shuffle_buffer=8) == shuffled
    assert order(shuffle=True, seed=1, epoch=1, shuffle_buffer=8) != shuffled
    assert order(shuffle=True, seed=1, shuffle_buffer=8) != order(shuffle=True, seed=1, shuffle_buffer=8)
    # (path, video ids to skip) pairs, as the manifest's DatasetState.readable() returns them.
    skip = {rows_a[0]["video_id"]}
    kept = [
        (v, int(c))
        for x in iter_clips([(a["path"], skip), b["path"]], mode="train", batch_size=5, crop=CROP)
        for v, c in zip(x["video_id"], x["clip_index"], strict=True)
    ]
    assert len(kept) == len(plain) - 3 and not any(v in skip for v, _ in kept)


def test_iter_clips_refuses_shards_of_different_runs(tmp_path):
    _, _, a = write(tmp_path, name="a.parquet")
    other = make_meta(T=1, alpha=8)
    rows = [dict(r, slow_index=[0]) for r in clip_rows()]
    b = write_shard(clips_to_table(rows, other), str(tmp_path / "b.parquet"))
    with pytest.raises(ShardError, match="T=1 alpha=8"):
        next(iter_clips([a["path"], b["path"]], mode="train", batch_size=2, crop=CROP))


def test_ray_data_map_batches_gives_what_the_local_reader_gives(ray_local, tmp_path):
    from ray.data import ActorPoolStrategy

    meta, rows, entry = write(tmp_path)
    local = ClipTransform(meta, "train", CROP, seed=0, epoch=3)(pq.read_table(entry["path"]))
    # Two CPUs (ray_local): the transform actor holds one, the Parquet read tasks need the other.
    out = (
        ray_local.data.read_parquet(entry["path"])
        .map_batches(
            ClipTransform,
            fn_constructor_kwargs=dict(meta=meta, mode="train", crop=CROP, seed=0, epoch=3),
            batch_format="numpy",
            batch_size=4,
            compute=ActorPoolStrategy(size=1),
        )
        .take_all()
    )
    assert len(out) == len(rows)
    by_clip = {(r["video_id"], int(r["clip_index"])): r for r in out}
    for i, vid in enumerate(local["video_id"]):
        got = by_clip[(vid, int(local["clip_index"][i]))]
        np.testing.assert_array_equal(got["fast"], local["fast"][i])
        np.testing.assert_array_equal(got["slow_index"], local["slow_index"][i])
        assert got["label"] == local["label"][i]


def test_chunked_reader_equals_the_whole_clip_transforms(tmp_path):
    meta, rows, entry = write(tmp_path, "raw")
    t = ClipTransform(meta, "train", CROP, seed=9, epoch=4)
    out = t(pq.read_table(entry["path"]))
    fast = transforms.resize_regions(torch.from_numpy(out["fast"]), torch.from_numpy(out["region"])).numpy()
    flips = 0
    for i, row in enumerate(rows):
        view = transforms.train_view(row["frames"], CROP, t.jitter, t._rng(row["video_id"], row["clip_index"]))
        np.testing.assert_array_equal(fast[i], view)
        draws = t._rng(row["video_id"], row["clip_index"])
        transforms.random_crop_box(48, 64, CROP, t.jitter, draws)
        flips += draws.random() < 0.5
    assert 0 < flips < len(rows)  # mirrored and plain crops both checked
