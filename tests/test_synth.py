"""The synthetic dataset: Kinetics layout and CSVs, determinism, real H.264 files, and the property it exists for:
classes differ by motion only, and the fast-only pairs are separable at the fast pathway's rate but not at the
slow pathway's."""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from slowfast.video import synth
from slowfast.video.synth import CLASSES, SynthError, encode_video, render, sample_video, write_dataset

LABELS = [c.label for c in CLASSES]
SMALL = dict(width=64, height=48, seconds=1.0)  # 30 frames a video: the layout tests stay fast
FAST_STRIDE, SLOW_STRIDE = 2, 10  # slowfast_tiny at 30 fps: alpha * T = 16 frames at stride 2; T = 4 at stride 10
TAU8_STRIDE = 8  # a Slow-only network sampling T frames at stride tau = 8


def ks_bound(n: int) -> float:
    """Accuracy of the best threshold that two samples of n from one distribution stay under, at the 1% level:
    the best threshold scores 1/2 + D/2 where D is the Kolmogorov-Smirnov statistic."""
    return 0.5 + 1.63 * math.sqrt(2 / n) / 2


def best_threshold_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.r_[a, b], np.r_[np.ones(len(a)), np.zeros(len(b))]
    return max(max(((x <= t) == y).mean(), ((x > t) == y).mean()) for t in x)


def decode(path: Path, fmt: str = "rgb24") -> tuple[np.ndarray, av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format=fmt) for f in container.decode(stream)])
        return frames, stream


def roundtrip_gray(spec, path: Path) -> np.ndarray:
    """Render, encode with H.264, decode: luma frames as float32, what a pipeline would read."""
    encode_video(path, render(spec), spec.fps)
    return decode(path, "gray")[0].astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "kinetics-synth"
    return out, write_dataset(out, 3, 4, seed=7, workers=1, **SMALL)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# The class table


def test_class_order_interleaves_slow_classes_and_complete_fast_only_pairs():
    assert len(set(LABELS)) == len(LABELS)
    assert all(c.description and "\n" not in c.description for c in CLASSES)
    assert CLASSES[0].seen_by == "slow"
    for i, c in enumerate(CLASSES):
        if c.seen_by == "fast only":
            # A pair is adjacent, so any prefix of three or more classes holds at least one complete pair.
            neighbours = {CLASSES[j].label for j in (i - 1, i + 1) if 0 <= j < len(CLASSES)}
            assert c.partner in neighbours and CLASSES[LABELS.index(c.partner)].partner == c.label
        else:
            assert c.seen_by == "slow" and c.partner is None
    demo = CLASSES[:8]  # the demo's classes: Slow-only can get at most the slow ones and half of each pair
    assert sum(c.seen_by == "slow" for c in demo) == 4
    for n in range(3, len(CLASSES) + 1):
        assert any(c.partner in LABELS[:n] for c in CLASSES[:n])


def test_the_module_docstring_table_is_the_class_list():
    rows = [line.split(None, 1)[1] for line in synth.__doc__.splitlines() if re.match(r"^\s*\d+  ", line)]
    assert [re.split(r"\s{2,}", row) for row in rows] == [[c.label, c.seen_by, c.description] for c in CLASSES]


def test_asking_for_more_classes_than_defined_says_how_many_there_are(tmp_path):
    with pytest.raises(SynthError, match=rf"classes={len(CLASSES) + 1}: the synthetic set defines {len(CLASSES)} "):
        write_dataset(tmp_path, len(CLASSES) + 1, 1, seed=0)
    assert synth.class_names(3) == LABELS[:3]
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Layout, annotations, files


def test_layout_and_official_kinetics_csv_format(dataset):
    out, summary = dataset
    assert summary["videos"] == {"train": 9, "val": 3}  # 4 a class, the last round(4 * 0.25) = 1 in val
    assert summary["classes"] == LABELS[:3]
    for split in ("train", "val"):
        csv_path = out / "annotations" / f"{split}.csv"
        assert summary["annotations"][split] == str(csv_path)
        text = csv_path.read_text()
        assert text.splitlines()[0] == "label,youtube_id,time_start,time_end,split"
        # Labels with spaces are quoted as in the official Kinetics-400 files: "air drumming",...
        assert '"stripes drifting up",' in text
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == summary["videos"][split]
        for row in rows:
            assert row["split"] == split
            assert re.fullmatch(r"[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]", row["youtube_id"])
            start, end = int(row["time_start"]), int(row["time_end"])
            assert end - start == math.ceil(SMALL["seconds"])
            video = out / split / row["label"] / f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
            assert video.is_file(), video
    videos = sorted(out.rglob("*.mp4"))
    assert len(videos) == 12 and not list(out.rglob("*partial*"))
    assert {p.parent.name for p in videos} == set(LABELS[:3])


def test_decoded_videos_have_the_frames_rate_and_pictures_that_were_rendered(dataset):
    out, summary = dataset
    for class_index, video_index in ((0, 3), (1, 0), (2, 2)):  # video 3 of each class is in val
        split = "val" if video_index == 3 else "train"
        youtube_id, start, end = synth.video_key(7, class_index, video_index, SMALL["seconds"])
        path = out / split / LABELS[class_index] / f"{youtube_id}_{start:06d}_{end:06d}.mp4"
        frames, stream = decode(path, "gray")
        assert stream.codec_context.name == "h264" and stream.average_rate == 30
        assert frames.shape == (summary["frames_per_video"], 48, 64) == (30, 48, 64)
        # The rendered video, up to compression; luma only, as yuv420p keeps a quarter of the chroma samples.
        luma = render(sample_video(7, class_index, video_index, **SMALL)) @ np.float32([0.299, 0.587, 0.114])
        assert np.abs(frames - luma).mean() < 3.0


def test_same_seed_gives_identical_bytes_and_another_seed_different_videos(dataset, tmp_path):
    out, _ = dataset
    first = files(out)
    write_dataset(tmp_path / "again", 3, 4, seed=7, **SMALL)
    assert files(tmp_path / "again") == first
    write_dataset(tmp_path / "other", 3, 4, seed=8, **SMALL)
    other = files(tmp_path / "other")
    assert not set(other) & {k for k in first if k.endswith(".mp4")}
    assert not {hashlib.sha256(v).digest() for v in other.values()} & {
        hashlib.sha256(v).digest() for v in first.values()
    }


def test_bytes_do_not_depend_on_threads_workers_or_what_ran_before(dataset, tmp_path):
    """The fixture wrote one video at a time; here torch runs on another thread count after a 3D convolution,
    numpy's global generator has been used, another seed was rendered, and three videos are written at once."""
    out, _ = dataset
    threads, numpy_state = torch.get_num_threads(), np.random.get_state()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        torch.nn.functional.conv3d(torch.randn(2, 3, 8, 32, 32), torch.randn(4, 3, 3, 3, 3)).sum().item()
        np.random.seed(1234)
        np.random.standard_normal(1000)
        render(sample_video(99, 5, 0, **SMALL))
        write_dataset(tmp_path, 3, 4, seed=7, workers=3, **SMALL)
    finally:
        torch.set_num_threads(threads)
        np.random.set_state(numpy_state)
    assert files(tmp_path) == files(out)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _leave_in_the_heap(libc, fill: bytes) -> None:
    """What earlier work leaves behind: blocks of 32 B to 64 kB in this thread's malloc arena filled with `fill`
    (repeated), then freed, for the next allocations (the encoder's among them) to reuse as they are."""
    blocks = []
    for size in [1 << k for k in range(5, 17)] * 16:
        block = libc.malloc(size)
        ctypes.memmove(block, (fill * (size // len(fill) + 1))[:size], size)
        blocks.append(block)
    for block in blocks:
        libc.free(block)


@pytest.mark.skipif(_libc() is None, reason="fills the heap through glibc's malloc")
def test_bytes_do_not_depend_on_what_earlier_work_left_in_the_heap(dataset, tmp_path):
    """The cause of a fresh-clone failure: x264's macroblock-tree rate control reads heap memory it has not
    written, so the same frames encoded to other bytes depending on what ran before in the process (3 of the
    fixture's 12 videos, after the whole suite up to this module; here 1 or 2 of them after a 0xff fill, with
    mbtree on). With it off, what the heap held does not count."""
    out, _ = dataset
    libc = _libc()
    written = {path.name: path.read_bytes() for path in out.rglob("*.mp4")}
    noise = bytes(np.random.default_rng(0).integers(0, 256, 4099, np.uint8))
    for fill in (b"\xff", b"\x00", b"\x7f\xff\xff\xff", noise):
        _leave_in_the_heap(libc, fill)
        for class_index in range(3):
            for video_index in range(4):
                spec = sample_video(7, class_index, video_index, **SMALL)
                youtube_id, start, end = synth.video_key(7, class_index, video_index, SMALL["seconds"])
                name = f"{youtube_id}_{start:06d}_{end:06d}.mp4"
                path = encode_video(tmp_path / name, render(spec), spec.fps)  # on this thread
                assert path.read_bytes() == written[name], (fill[:4], name)


# A fresh interpreter on one CPU (FFmpeg and x264 size their automatic thread counts from it), with the usual
# thread variables at 1, another hash seed, and FFmpeg's SIMD code switched off as `ffmpeg -cpuflags 0` does.
_FRESH_PROCESS = """
import ctypes, json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import av
libavutil = next(line.split()[-1] for line in open("/proc/self/maps") if "libavutil" in line)
ctypes.CDLL(libavutil).av_force_cpu_flags(0)
from slowfast.video.synth import write_dataset
write_dataset(sys.argv[1], 3, 4, seed=7, workers=2, **json.loads(sys.argv[2]))
"""


@pytest.mark.heavy  # a process of its own
@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not Path("/proc/self/maps").exists(),
    reason="pins CPUs and finds FFmpeg's library the Linux way",
)
def test_bytes_do_not_depend_on_cpu_count_thread_variables_or_ffmpeg_simd(dataset, tmp_path):
    out, _ = dataset
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "12345",
    }
    subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path), json.dumps(SMALL)],
        env=env,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert files(tmp_path) == files(out)


def test_x264_records_that_it_encoded_on_one_thread(dataset):
    """x264 writes its settings into the stream; more threads, or its automatic count (1.5 per CPU), would
    encode other bytes."""
    out, _ = dataset
    videos = sorted(out.rglob("*.mp4"))
    assert videos
    for video in videos:
        settings = re.search(rb"x264 - core \d+ .*? options: ([^\x00]*)", video.read_bytes())
        assert settings and b" threads=1 lookahead_threads=1 sliced_threads=0 " in settings.group(1), video


def test_workers_must_be_at_least_one(tmp_path):
    with pytest.raises(SynthError, match="workers=0: the number of videos written at once must be at least 1"):
        write_dataset(tmp_path, 1, 1, seed=0, workers=0)
    assert not any(tmp_path.iterdir())


def test_a_video_does_not_depend_on_how_many_others_are_generated(dataset, tmp_path):
    out, _ = dataset
    write_dataset(tmp_path, 1, 1, seed=7, val_fraction=0, **SMALL)  # only class 0, video 0
    youtube_id, start, end = synth.video_key(7, 0, 0, SMALL["seconds"])
    name = f"train/{LABELS[0]}/{youtube_id}_{start:06d}_{end:06d}.mp4"
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert np.array_equal(render(sample_video(7, 0, 0, **SMALL)), render(sample_video(7, 0, 0, **SMALL)))


# ---------------------------------------------------------------------------------------------------------------
# Motion, not appearance


def loo_nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier on standardised features."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-9)
    hits = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        classes = np.unique(labels[keep])
        centroids = np.stack([x[keep][labels[keep] == c].mean(0) for c in classes])
        hits += classes[np.argmin(((centroids - x[i]) ** 2).sum(1))] == labels[i]
    return hits / len(x)


def test_colour_statistics_do_not_predict_the_class_but_motion_does():
    per_class = 12
    colour, motion, labels = [], [], []
    for class_index in range(len(CLASSES)):
        for i in range(per_class):
            frames = render(sample_video(21, class_index, i, width=64, height=48, seconds=1.0)).astype(np.float32)
            colour.append(np.r_[frames.mean((0, 1, 2)), frames.std((0, 1, 2))])  # mean and spread of colour
            step = np.abs(np.diff(frames[:, ..., 1], axis=0))
            motion.append([step.mean(), np.abs(frames[10:, ..., 1] - frames[:-10, ..., 1]).mean()])
            labels.append(class_index)
    labels = np.array(labels)
    chance = 1 / len(CLASSES)
    colour_acc = loo_nearest_centroid_accuracy(np.array(colour), labels)
    motion_acc = loo_nearest_centroid_accuracy(np.log(np.array(motion) + 1e-3), labels)
    assert colour_acc < chance + 0.1, colour_acc
    assert motion_acc > colour_acc + 0.15, (motion_acc, colour_acc)


# ---------------------------------------------------------------------------------------------------------------
# The fast-only pairs: separable at the fast rate, at chance at the slow rate


def test_stripe_drift_direction_is_clear_at_the_fast_rate_and_aliased_away_at_the_slow_rate(tmp_path):
    """Wagon-wheel aliasing, measured on decoded videos with a gradient motion estimate: sum(I_y * I_t) over a
    clip's frame pairs has the sign of sin(phase step), which is the direction at 15 Hz and a coin flip at
    3 or 3.75 Hz."""
    per_class, clip = 30, 31  # a slowfast_tiny clip: 32 source frames (T * tau)
    votes = {FAST_STRIDE: [], SLOW_STRIDE: [], TAU8_STRIDE: []}
    truth = []
    for label, sign in (("stripes drifting up", 1), ("stripes drifting down", -1)):
        for i in range(per_class):
            spec = sample_video(3, LABELS.index(label), i, width=64, height=48, seconds=1.4)
            frames = roundtrip_gray(spec, tmp_path / "v.mp4")
            start = np.random.default_rng(i).integers(0, len(frames) - clip)  # clips start anywhere
            for stride in votes:
                f = frames[start : start + clip : stride]
                grad_y = np.gradient(f, axis=1)
                motion = ((grad_y[1:] + grad_y[:-1]) / 2 * (f[1:] - f[:-1])).sum()
                votes[stride].append(np.sign(motion))
            truth.append(sign)
    truth = np.array(truth)
    accuracy = {stride: (np.array(v) == truth).mean() for stride, v in votes.items()}
    n = len(truth)
    assert accuracy[FAST_STRIDE] >= 0.95, accuracy
    for stride in (SLOW_STRIDE, TAU8_STRIDE):  # a binomial coin at the 1% level
        assert abs(accuracy[stride] - 0.5) < 2.58 * 0.5 / math.sqrt(n), accuracy


@pytest.mark.parametrize("pair", [("flickering smoothly", "flickering erratically"), ("wobbling", "jittering")])
def test_smooth_and_erratic_noise_differ_at_the_fast_rate_and_not_at_the_slow_rate(pair, tmp_path):
    """Von Neumann ratio of the frames a pathway samples: mean squared step between sampled frames over twice their
    variance. Smooth noise at 15 Hz changes little per step (ratio ~ 1 - 0.76); erratic noise ~ 1. At 3 Hz both
    are independent draws of equal variance, so both ratios are ~ 1 and no threshold separates them."""
    per_class = 24
    ratios = {FAST_STRIDE: {}, SLOW_STRIDE: {}}
    for label in pair:
        for stride in ratios:
            ratios[stride][label] = []
        for i in range(per_class):
            spec = sample_video(5, LABELS.index(label), i, width=64, height=48, seconds=3.0)
            frames = roundtrip_gray(spec, tmp_path / "v.mp4")
            for stride in ratios:
                f = frames[i % stride :: stride]  # one sampling grid, starting anywhere
                steps = ((f[1:] - f[:-1]) ** 2).mean()
                ratios[stride][label].append(steps / (2 * f.var(axis=0).mean()))
    smooth, erratic = pair
    fast = best_threshold_accuracy(np.array(ratios[FAST_STRIDE][smooth]), np.array(ratios[FAST_STRIDE][erratic]))
    slow = best_threshold_accuracy(np.array(ratios[SLOW_STRIDE][smooth]), np.array(ratios[SLOW_STRIDE][erratic]))
    assert np.mean(ratios[FAST_STRIDE][smooth]) < 0.6 < np.mean(ratios[FAST_STRIDE][erratic])
    assert fast >= 0.95, fast
    assert slow < ks_bound(per_class), (slow, ks_bound(per_class))


# ---------------------------------------------------------------------------------------------------------------
# encode_video: the general encoder other tests reuse


def frames_for_codecs(n=12, height=48, width=64):
    spec = sample_video(1, LABELS.index("scrolling up"), 0, width=width, height=height, seconds=n / 30)
    return render(spec)


@pytest.mark.parametrize("codec, suffix", [("h264", ".mp4"), ("mpeg4", ".avi"), ("vp9", ".webm"), ("hevc", ".mkv")])
def test_encode_video_writes_other_codecs_deterministically(codec, suffix, tmp_path):
    if not synth.encoder_available(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames = frames_for_codecs()
    a = encode_video(tmp_path / f"a{suffix}", frames, 30, codec=codec)
    b = encode_video(tmp_path / f"b{suffix}", frames, 30, codec=codec)
    assert a.read_bytes() == b.read_bytes()
    decoded, stream = decode(a)
    assert len(decoded) == len(frames) and stream.average_rate == 30
    assert np.abs(decoded.astype(np.float32) - frames).mean() < 6


def test_encode_video_ntsc_rate_audio_and_rotation(tmp_path):
    frames = frames_for_codecs(n=30)
    path = encode_video(tmp_path / "ntsc.mp4", frames, Fraction(30000, 1001), audio=synth.tone(1.0), rotation=90)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        video = container.streams.video[0]
        assert video.average_rate == Fraction(30000, 1001)
        assert container.streams.audio[0].codec_context.name == "aac"
        decoded = list(container.decode(video))
    assert len(decoded) == 30 and decoded[0].rotation == 90
    assert decoded[-1].time == pytest.approx(29 * 1001 / 30000, abs=1e-3)


def test_encode_video_variable_frame_rate_from_timestamps(tmp_path):
    frames = frames_for_codecs(n=10)
    times = [0.0, 0.03, 0.1, 0.12, 0.3, 0.31, 0.5, 0.55, 0.7, 0.9]
    path = encode_video(tmp_path / "vfr.mp4", frames, 30, timestamps=times)
    with av.open(str(path)) as container:
        decoded = [f.time for f in container.decode(video=0)]
    assert decoded == pytest.approx(times, abs=1e-3)
    with pytest.raises(SynthError, match="strictly increasing"):
        encode_video(tmp_path / "bad.mp4", frames, 30, timestamps=times[::-1])
