"""The uint8 loader and clip_inputs give the network the same inputs as the float-free path they replace
(uint8 planar slow + fast clips cut on the CPU, normalised on the device), bit for bit: shards preprocessed
from real H.264 videos, read by iter_clips in train mode (fixed seed and epoch, shuffled) and eval mode."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.ingest import Task
from pipelines.preprocess import decode_video
from pipelines.train_input import TRAIN_COLUMNS, train_clips
from slowfast.shards import ShardMeta, clips_to_table, decode_frames, write_shard
from slowfast.shards.reader import ClipTransform, iter_clips
from slowfast.train import clip_inputs
from slowfast.video import transforms
from slowfast.video.synth import encode_video, iter_frames, sample_video

T, TAU, ALPHA = 4, 4, 4
CROP, JITTER = 32, (40, 48)
FORMATS = (torch.channels_last_3d, torch.contiguous_format)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Two train clips and three eval views of each of 3 synthetic H.264 videos (128x96, 1.5 s), as the
    preprocess step cuts them, in one JPEG shard per mode."""
    folder = tmp_path_factory.mktemp("loader")
    out = {}
    for mode, clips in (("train", 2), ("eval", 3)):
        meta = ShardMeta(
            dataset="loader",
            split=mode,
            class_names=["a", "b", "c"],
            T=T,
            alpha=ALPHA,
            tau=TAU,
            target_fps=30,
            short_side=48,
            frame_format="jpeg",
            jpeg_quality=90,
        )
        rows = []
        for v in range(3):
            path = folder / f"video{v}.mp4"
            if not path.exists():
                spec = sample_video(0, v, v, width=128, height=96, seconds=1.5)
                encode_video(path, iter_frames(spec), spec.fps)
            task = Task(video_id=f"video{v}", label=v, rel=path.name, size=path.stat().st_size, etag="0")
            rows += decode_video(str(path), task, meta, mode=mode, num_clips=clips, seed=1, max_pixels=1 << 20)[0]
        out[mode] = (meta, write_shard(clips_to_table(rows, meta), str(folder / f"{mode}.parquet"))["path"])
    return out


def old_inputs(views: list[np.ndarray], slow_index: np.ndarray, fmt: torch.memory_format) -> list[torch.Tensor]:
    """The path this loader replaces: uint8 (3, T, H, W) clips cut on the CPU (planar), the slow pathway
    copied there too, both normalised on the device with per-channel tensors, then put in layout `fmt`."""
    fast = np.stack([np.ascontiguousarray(v.transpose(3, 0, 1, 2)) for v in views])  # (3, T, H, W)
    slow = np.take(fast, slow_index, axis=2)
    shape = (3, 1, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in transforms.STD]).view(shape)
    shift = torch.tensor([m / s for m, s in zip(transforms.MEAN, transforms.STD, strict=True)]).view(shape)
    return [torch.from_numpy(x).float().mul_(scale).sub_(shift).contiguous(memory_format=fmt) for x in (slow, fast)]


def stored_clips(path: str) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
    """(video_id, clip_index) -> the clip's frames, JPEG-decoded in full; and the shard's slow_index, which
    every row holds."""
    table = pq.read_table(path)
    clips = {
        (vid, idx): decode_frames(frames, "jpeg", h, w)
        for vid, idx, frames, h, w in zip(
            *(table.column(c).to_pylist() for c in ("video_id", "clip_index", "frames", "height", "width")), strict=True
        )
    }
    (slow_index,) = {tuple(row) for row in table.column("slow_index").to_pylist()}
    return clips, np.asarray(slow_index, np.intp)


def test_train_inputs_are_bit_exact_with_the_old_path(shard):
    meta, path = shard["train"]
    clips, slow_index = stored_clips(path)
    reference = ClipTransform(meta, "train", CROP, jitter=JITTER, seed=2, epoch=1)  # the crops' draws
    seen, flips = 0, 0
    for batch in iter_clips(
        [path], mode="train", batch_size=4, crop=CROP, jitter=JITTER, seed=2, epoch=1, shuffle=True
    ):
        assert batch["fast"].dtype == torch.uint8 and "slow" not in batch
        views = []
        for vid, idx in zip(batch["video_id"], batch["clip_index"].tolist(), strict=True):
            views.append(transforms.train_view(clips[vid, idx], CROP, JITTER, reference._rng(vid, idx)))
            draws = reference._rng(vid, idx)
            transforms.random_crop_box(*clips[vid, idx].shape[1:3], CROP, JITTER, draws)
            flips += draws.random() < 0.5
        for fmt in FORMATS:
            for new, old in zip(clip_inputs(batch, fmt), old_inputs(views, slow_index, fmt), strict=True):
                assert new.shape == old.shape and new.is_contiguous(memory_format=fmt)
                assert torch.equal(new, old)
        seen += len(views)
    assert seen == len(clips) == 6 and 0 < flips < seen  # every clip, mirrored and plain ones


def test_eval_inputs_of_the_chosen_views_are_bit_exact_with_the_old_path(shard):
    meta, path = shard["eval"]
    clips, slow_index = stored_clips(path)
    seen = []
    for batch in iter_clips([path], mode="eval", batch_size=2, crop=CROP, spatial_crops=3, views=[0, 2]):
        ids = list(zip(batch["video_id"], batch["clip_index"].tolist(), strict=True))
        views = [v for vid, idx in ids[::3] for v in transforms.eval_views(clips[vid, idx], CROP, 3)]
        assert batch["spatial_index"].tolist() == [0, 1, 2] * (len(ids) // 3)
        for fmt in FORMATS:
            for new, old in zip(clip_inputs(batch, fmt), old_inputs(views, slow_index, fmt), strict=True):
                assert torch.equal(new, old)
        seen += ids[::3]
    assert sorted(seen) == sorted(key for key in clips if key[1] in (0, 2))


def test_ray_data_train_columns_carry_the_frames_once(shard):
    meta, path = shard["train"]
    out = train_clips(pq.read_table(path), meta, CROP, JITTER, seed=0)
    assert TRAIN_COLUMNS == ["fast", "region", "slow_index", "label"] and set(TRAIN_COLUMNS) <= set(out)
    batch = {k: torch.from_numpy(out[k]) for k in TRAIN_COLUMNS}
    slow, fast = clip_inputs(batch, torch.channels_last_3d)
    assert slow.shape == (6, 3, T, CROP, CROP) and fast.shape == (6, 3, ALPHA * T, CROP, CROP)
    # One uint8 copy of the frames crosses Ray, as each clip's crop box before the resize (at most
    # 32 * 48 / 40 -> 39 pixels a side here); the slow pathway adds T indices per clip, not T more frames.
    side = transforms.region_side(48, CROP, JITTER)
    assert side == 39 and out["fast"].shape == (6, ALPHA * T, side, side, 3)
    assert out["fast"].nbytes == 6 * ALPHA * T * side * side * 3 and out["slow_index"].nbytes == 6 * T * 8
    heights, widths, flips, sizes = out["region"].T
    assert (sizes == CROP).all() and ((32 <= heights) & (heights <= side) & (32 <= widths) & (widths <= side)).all()
    assert len(set(heights.tolist())) > 1 and set(flips.tolist()) <= {0, 1}


def test_a_box_too_big_for_the_region_is_resized_by_the_loader(shard):
    """A frame stored above the shard's short side (not something preprocess writes) gives crop boxes larger
    than the region: the loader resizes those itself and the device takes them as they are."""
    meta, path = shard["train"]
    table = pq.read_table(path)
    small = ClipTransform(meta, "train", CROP, jitter=JITTER, seed=3, epoch=0)
    tight = ClipTransform(meta.model_copy(update={"short_side": 40}), "train", CROP, jitter=JITTER, seed=3, epoch=0)
    assert tight.region_side == CROP < small.region_side
    wide, narrow = small(table), tight(table)
    assert (wide["region"][:, :2] > CROP).any()  # the same draws: some boxes exceed the tight region
    assert narrow["fast"].shape[2:4] == (CROP, CROP) and (narrow["region"][:, [0, 1, 3]] == CROP).all()
    for out in (wide, narrow):
        out.pop("video_id")
    same = [
        clip_inputs({k: torch.from_numpy(v) for k, v in out.items()}, torch.channels_last_3d) for out in (wide, narrow)
    ]
    for a, b in zip(*same, strict=True):
        assert torch.equal(a, b)


def test_the_float_resize_that_devices_run_is_within_one_level_of_the_cpu_kernel(shard):
    """Devices have no uint8 bilinear kernel: resize_regions resizes there in float32 and rounds. On the
    same boxes, that lands within one level of the CPU's fixed-point pixels, and mostly on them."""
    meta, path = shard["train"]
    out = train_clips(pq.read_table(path), meta, CROP, JITTER, seed=0)
    for b, (h, w, _, size) in enumerate(out["region"].tolist()):
        box = torch.from_numpy(np.ascontiguousarray(out["fast"][b, :, :h, :w])).permute(0, 3, 1, 2)
        exact = transforms._bilinear(box, size, size, in_float=False).int()
        rounded = transforms._bilinear(box, size, size, in_float=True).int()
        assert (exact - rounded).abs().max() <= 1 and (exact == rounded).float().mean() > 0.5


def test_normalize_tensor_with_per_channel_statistics_matches_the_cpu_normalize():
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2)
    np.testing.assert_array_equal(
        transforms.normalize_tensor(clip, mean, std).numpy(), transforms.normalize(frames, mean, std)
    )
