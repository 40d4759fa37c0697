"""The one clip path on real encoded videos: preprocess and serving cut the same frames, every distinct
frame is decoded and encoded once, and decoding through or seeking between windows gives the same
pixels whatever the GOP, B-frames or frame timing; the cost model reads dense views in one pass."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pipelines.ingest import Task
from pipelines.preprocess import decode_video
from slowfast.model import build
from slowfast.serving import ClipSpec, VideoClassifier
from slowfast.shards.schema import ShardMeta
from slowfast.video import transforms
from slowfast.video.clips import ClipSampling, cut_clips
from slowfast.video.decode import SEEK_COST_FRAMES, VideoReader
from slowfast.video.synth import encode_video, render, sample_video

from videos import encode_frame_number_video, read_frame_numbers

TARGET_FPS = 30
T, TAU, ALPHA = 8, 8, 4  # slowfast_8x8: 64-frame windows, 32 Fast frames
EVAL = ClipSampling(T=T, tau=TAU, alpha=ALPHA, target_fps=TARGET_FPS, short_side=None, mode="eval", num_clips=10)
TRAIN = ClipSampling(
    T=T, tau=TAU, alpha=ALPHA, target_fps=TARGET_FPS, short_side=None, mode="train", num_clips=3, seed=4
)


def _vfr_pts(n):
    rng = np.random.default_rng(5)
    return np.concatenate([[0], np.cumsum(rng.integers(5, 70, n - 1))]).tolist()


# name: encoder settings of a 300-frame (10 s at 30 fps) frame-number video.
GOPS = {
    "gop1_all_keyframes": dict(gop=1, bframes=0),
    "gop5_bframes3": dict(gop=5, bframes=3),
    "gop30_bframes3": dict(gop=30, bframes=3),
    "gop30_no_bframes": dict(gop=30, bframes=0),
    "gop250_bframes3": dict(gop=250, bframes=3),
    "vfr_gop30": dict(gop=30, bframes=0, time_base=Fraction(1, 1000), pts=_vfr_pts(300)),
    "vfr_gop30_bframes3": dict(gop=30, bframes=3, time_base=Fraction(1, 1000), pts=_vfr_pts(300)),
    "vp9_webm_gop30": dict(gop=30, codec="libvpx-vp9", container_format="webm"),
}


@pytest.fixture(scope="module")
def gop_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("gops")
    return {
        name: encode_frame_number_video(root / f"{name}.{'webm' if 'webm' in name else 'mp4'}", 300, **settings)
        for name, settings in GOPS.items()
    }


def _expected(video, indices):
    return [video.shown_at(Fraction(int(j), TARGET_FPS)) for j in indices]


@pytest.mark.parametrize("name", list(GOPS))
def test_decoding_through_and_seeking_give_the_same_pixels(gop_videos, name):
    video = gop_videos[name]
    policies = {
        "cost_model": {},
        "never_seek": dict(seek_cost_frames=math.inf, reseek_gap_sec=math.inf),
        "seek_when_possible": dict(seek_cost_frames=0, reseek_gap_sec=0.0),
    }
    frames, stats = {}, {}
    for policy, options in policies.items():
        with VideoReader(video.path, threads=1, **options) as reader:
            # Dense windows (ten eval views), then sparse ones (three random clips) on the same reader.
            cut = [cut_clips(reader, EVAL), cut_clips(reader, TRAIN, video_id=name)]
            stats[policy] = reader.stats
        frames[policy] = [clips.clip(i) for clips in cut for i in range(len(clips))]
        plans = [plan for clips in cut for plan in clips.plans]
        for plan, clip in zip(plans, frames[policy], strict=True):
            assert read_frame_numbers(clip) == _expected(video, plan.indices), (policy, plan)
    for policy in ("never_seek", "seek_when_possible"):
        for clip, reference in zip(frames[policy], frames["cost_model"], strict=True):
            np.testing.assert_array_equal(clip, reference)
    assert stats["never_seek"].seeks == 1  # only back, from the end of the views to the first random clip
    if "gop1_" in name or "gop5_" in name:  # a keyframe near every window start: seeking skips frames
        assert stats["seek_when_possible"].seeks > 1


def test_dense_eval_views_read_the_video_once_and_sparse_windows_seek(tmp_path):
    video = encode_frame_number_video(tmp_path / "ten_s.mp4", 300, gop=30, bframes=3)
    with VideoReader(video.path, threads=1) as reader:
        clips = cut_clips(reader, EVAL)
        # Ten 64-frame views over 300 frames overlap: one pass, no seek, nothing decoded twice.
        assert reader.stats.seeks == 0
        assert reader.stats.frames_decoded <= 300
        assert reader.stats.frames_converted == len(clips.frames)

    long = encode_frame_number_video(tmp_path / "forty_s.mp4", 1020, gop=30, bframes=3, width=64, height=48)
    sparse = ClipSampling(T=T, tau=TAU, alpha=ALPHA, target_fps=TARGET_FPS, short_side=None, num_clips=3)
    with VideoReader(long.path, threads=1) as reader:
        clips = cut_clips(reader, sparse)
        # Three views 11 s apart: a seek to the keyframe before each, not 1,020 frames of decoding.
        assert reader.stats.seeks == 2
        assert reader.stats.frames_decoded < 3 * (64 + 30) + 2
    for i, plan in enumerate(clips.plans):
        assert read_frame_numbers(clips.clip(i)) == plan.indices.tolist()


def test_seek_cost_counts_the_frames_decode_threads_hold_in_flight(tmp_path):
    video = encode_frame_number_video(tmp_path / "v.mp4", 30)
    with VideoReader(video.path, threads=1) as one, VideoReader(video.path, threads=4) as four:
        assert (one.seek_cost_frames, four.seek_cost_frames) == (SEEK_COST_FRAMES, SEEK_COST_FRAMES + 3)


def test_clips_store_each_frame_once_and_match_decode_windows(gop_videos):
    video = gop_videos["gop30_bframes3"]
    encoded = []

    def encode(frame):
        encoded.append(frame.copy())
        return len(encoded) - 1

    sampling = ClipSampling(T=T, tau=TAU, alpha=ALPHA, target_fps=TARGET_FPS, short_side=64, num_clips=10)
    with VideoReader(video.path, threads=1) as reader:
        windows = reader.decode_windows([p.times(TARGET_FPS) for p in sampling.plans(300)], short_side=64)
        clips = cut_clips(reader, sampling, encode=encode)
    distinct = {int(j) for p in clips.plans for j in p.indices}
    # 320 Fast frames in ten overlapping views, each distinct frame decoded and encoded once.
    assert len(encoded) == len(clips.frames) == len(distinct) < 10 * ALPHA * T
    assert clips.frames == list(range(len(encoded)))
    assert (clips.height, clips.width) == (64, 85) == windows[0].shape[1:3]
    for i, window in enumerate(windows):
        np.testing.assert_array_equal(np.stack([encoded[k] for k in clips.items(i)]), window)
    assert clips.slow_index.tolist() == [0, 4, 8, 13, 17, 22, 26, 31]
    assert [round(clips.start_sec(i), 4) for i in (0, 9)] == [0.0, round(236 * 9 / 10 / TARGET_FPS, 4)]
    # Frames are told apart by the source frame, not by what encode returns: the same object for every frame
    # (bench data's decode-only pass returns None) still counts each distinct frame.
    with VideoReader(video.path, threads=1) as reader:
        assert len(cut_clips(reader, sampling, encode=lambda frame: None).frames) == len(distinct)


def test_preprocess_and_serving_cut_the_same_fast_frames(tmp_path):
    path = encode_video(tmp_path / "v.mp4", render(sample_video(0, 2, 0, width=200, height=120, seconds=3.0)), 30)
    model = build("slowfast_tiny", num_classes=3)  # T 4, tau 8, alpha 4
    spec = ClipSpec(T=4, tau=8, alpha=4, target_fps=15, short_side=96, crop=80, temporal_views=4, spatial_crops=3)
    classifier = VideoClassifier(model, ["a", "b", "c"], spec)
    fast, slow_index = classifier.views(path)

    meta = ShardMeta(
        dataset="d",
        split="val",
        class_names=["a", "b", "c"],
        T=4,
        alpha=4,
        tau=8,
        frames_per_clip=16,
        target_fps=15,
        short_side=96,
        frame_format="raw",
    )
    task = Task(video_id="v", label=0, rel="v.mp4", size=path.stat().st_size, etag="")
    rows, short = decode_video(path, task, meta, mode="eval", num_clips=4, seed=0, max_pixels=10**6)
    assert not short and [r["clip_index"] for r in rows] == [0, 1, 2, 3]
    views = []
    for row in rows:
        clip = np.frombuffer(row["frames"], np.uint8).reshape(16, row["height"], row["width"], 3)
        assert (row["height"], row["width"]) == (96, 160)
        views += list(transforms.eval_views(clip, spec.crop, spec.spatial_crops))
    np.testing.assert_array_equal(fast, np.stack(views))
    assert slow_index.tolist() == rows[0]["slow_index"]
    assert fast.shape == (12, 16, 80, 80, 3) and slow_index.shape == (4,)
    assert classifier.probabilities(path).sum() == pytest.approx(1.0, abs=1e-5)


def test_jpeg_rows_share_the_bytes_of_frames_that_views_share(gop_videos):
    video = gop_videos["gop30_bframes3"]
    meta = ShardMeta(
        dataset="d",
        split="val",
        class_names=["a"],
        T=T,
        alpha=ALPHA,
        tau=TAU,
        frames_per_clip=ALPHA * T,
        target_fps=TARGET_FPS,
        short_side=64,
        frame_format="jpeg",
        jpeg_quality=90,
    )
    task = Task(video_id="v", label=0, rel=video.path.name, size=0, etag="")
    rows, _ = decode_video(video.path, task, meta, mode="eval", num_clips=10, seed=0, max_pixels=10**6)
    distinct = {int(j) for p in EVAL.plans(300) for j in p.indices}
    assert len({id(jpeg) for row in rows for jpeg in row["frames"]}) == len(distinct)
    assert all(len(row["frames"]) == ALPHA * T and row["frames"][0][:2] == b"\xff\xd8" for row in rows)


def test_timeline_windows_cut_clips_along_the_video(tmp_path):
    video = encode_frame_number_video(tmp_path / "v.mp4", 300, gop=30)
    assert EVAL.clip_seconds == pytest.approx(64 / 30)
    *windows, tail = EVAL.windows(300, window_s=64 / 30, stride_s=1.0)
    # Windows of one clip (64 frames) every 30 frames, all inside the 300 frames: starts 0, 30, ..., 210, and
    # one more ending with the video (236 + 64 = 300).
    assert tail.plans[0].start_frame == pytest.approx(236.0) and tail.plans[0].indices[-1] == 299
    plans = [w.plans[0] for w in windows]
    assert [len(w.plans) for w in windows] == [1] * 8
    assert [p.start_frame for p in plans] == pytest.approx([30.0 * k for k in range(8)])
    assert [w.start_s for w in windows] == pytest.approx([float(k) for k in range(8)])
    assert not any(p.short for p in plans)
    assert [p.clip_index for p in plans] == list(range(8))
    with VideoReader(video.path, threads=1) as reader:
        clips = cut_clips(reader, EVAL, plans=plans)
    for i, plan in enumerate(plans):
        assert read_frame_numbers(clips.clip(i)) == plan.indices.tolist()
        assert clips.start_sec(i) == pytest.approx(float(i))
    assert read_frame_numbers(clips.clip(7))[-1] == 273  # 210 + 63

    # Default: back-to-back windows of one clip; 300 frames hold 4 of 64/30 s, and a fifth ends with the video.
    assert [round(w.start_s * 30) for w in EVAL.windows(300)] == [0, 64, 128, 192, 236]
    assert EVAL.windows(300)[-1].end_s == pytest.approx(10.0)
    # A 4-second window is scored by 2 clips centred on its halves; a 1-second one by one clip reaching out.
    (first, *_) = EVAL.windows(300, window_s=4.0, stride_s=2.0)
    assert [p.start_frame for p in first.plans] == pytest.approx([0.0, 58.0])  # centres 30, 90; clamped at 0
    short = EVAL.windows(300, window_s=1.0)
    assert len(short) == 10 and short[5].plans[0].start_frame == pytest.approx(165 - 32)
    (one,) = EVAL.windows(40)  # shorter than a clip: one window to its end, indices clamped
    assert one.end_s == pytest.approx(40 / 30) and one.plans[0].short and one.plans[0].indices[-1] == 39
    with pytest.raises(ValueError, match="stride_s > 0"):
        EVAL.windows(300, stride_s=0)


def test_decode_stream_takes_times_in_order(gop_videos):
    with VideoReader(gop_videos["gop30_bframes3"].path) as reader:
        frames = list(reader.decode_stream([0.0, 1 / 60, 0.5], short_side=None))
        # 1/60 s still shows frame 0: the same array, converted once.
        assert frames[0] is frames[1] and read_frame_numbers(np.stack(frames)) == [0, 0, 15]
        with pytest.raises(ValueError, match="ascending order"):
            reader.decode_stream([1.0, 0.5])


def test_clip_sampling_refuses_bad_fields_by_name():
    with pytest.raises(ValueError, match="ClipSampling: tau must be >= 1, got 0"):
        ClipSampling(T=8, tau=0, alpha=4, target_fps=30, short_side=256)
    with pytest.raises(ValueError, match="mode must be one of"):
        ClipSampling(T=8, tau=8, alpha=4, target_fps=30, short_side=256, mode="test")
    with pytest.raises(ValueError, match="target_fps must be > 0"):
        ClipSampling(T=8, tau=8, alpha=4, target_fps=0, short_side=256)
    assert ClipSampling(T=8, tau=8, alpha=4, target_fps=30, short_side=None).clip_size == 64
