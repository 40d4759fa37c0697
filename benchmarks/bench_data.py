"""Data benchmark: the shard loader against decoding clips on the fly, preprocessing against a plain decode,
bytes per clip, and Ray Data scaling; all on the same Kinetics-like videos (10 s, 30 fps, H.264).

    python -m pipelines bench data                        # about 5 minutes on 2 cores
    python -m pipelines bench data --quick                # smoke test, under a minute
    python -m pipelines bench data --only a,c --json out/bench_data.json

Clip config: slowfast_8x8_r50 sampling (T 8, tau 8, alpha 4: 32 fast frames over 64 source frames),
short side 256, train crops of 224 from a short side jittered in [256, 320] with flips, JPEG q90.

a. Loader clips/s per core: shard rows -> what the trainer reads (iter_clips / ClipTransform: each clip's crop box
   as uint8 THWC frames, where it lies, and the slow pathway's indices), against decoding each clip on the fly from
   the .mp4 as the reference loader does, and against the JPEG decodes alone (the bound a JPEG loader cannot beat).
   The on-the-fly baseline is the reference's steps done as cheaply as this repo knows how: open with PyAV
   (VideoReader), seek to a random window, decode to its end, convert only the 32 sampled frames, resizing to short
   side 256 in YUV, then the shard path's own ClipTransform (raw frames in). PySlowFast's own steps (convert every
   frame of the window at source size, normalise in float, then resize, copy the slow pathway) are timed too,
   against our loader with the device's share added, as they do the same work. The device's share,
   slowfast.train.clip_inputs (the box's flip and resize to the crop, slow pathway by index, normalise, layout), is
   timed apart on this CPU, where a CPU trainer runs it; on a GPU it runs there and costs the CPU nothing.
b. Preprocess CPU time per video (open and probe, plan, decode the clip windows, JPEG-encode, build and
   write the table) against a full decode of every frame of the same video to RGB at source size, through
   one swscale context kept for the video (the goal's baseline); and against PyAV's plain
   frame.to_ndarray(format="rgb24"), which builds a new context per frame and costs ~0.5 ms more a frame.
   Apart: the eval views' decoding pass without the encodes, and the decoder alone with no conversion at all,
   which with the encodes gives the floor of a whole-video eval pass that JPEG-encodes the views' frames.
c. Bytes per clip in the written Parquet files, JPEG q90 against raw uint8 frames.
d. The real Ray Data preprocess job (ingest, then pipelines.preprocess.preprocess_split, as run_preprocess
   runs it) on a fresh local Ray with 2 CPUs against 1: the actor pool takes one actor per cluster CPU.

Every timed case of a-b runs single-threaded (torch, PyAV, Arrow: one thread each) and is charged the CPU
time of the process: the figures are per core, and other work on the machine inflates them far less than
it does wall-clock time (shared caches and memory bandwidth still leave run-to-run spreads of ~10-20% on
a busy machine; the ratios, timed alternately in one run, move less).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run as a script or loaded by path: make `benchmarks` and `slowfast` importable
    sys.path.insert(0, _ROOT)

import av  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import simplejpeg  # noqa: E402
from av.video.reformatter import VideoReformatter  # noqa: E402

from benchmarks._common import (
    CoreUse,
    environment,
    format_table,
    ratio,
    time_interleaved,  # noqa: E402
    write_json,
)
from pipelines.ingest import Task  # noqa: E402
from pipelines.preprocess import decode_video  # noqa: E402
from slowfast.shards.reader import ClipTransform, iter_clips  # noqa: E402
from slowfast.shards.schema import ShardMeta, clips_to_table, write_shard  # noqa: E402
from slowfast.train import clip_inputs  # noqa: E402
from slowfast.video import transforms  # noqa: E402
from slowfast.video.clips import ClipSampling, cut_clips  # noqa: E402
from slowfast.video.decode import DEFAULT_MAX_PIXELS, VideoReader  # noqa: E402
from slowfast.video.sampling import plan_clips, slow_indices  # noqa: E402
from slowfast.video.synth import CLASSES, encode_video, iter_frames, sample_video  # noqa: E402

# slowfast_8x8_r50 and the paper's training recipe.
T, TAU, ALPHA = 8, 8, 4
FAST = ALPHA * T
TARGET_FPS = 30
SHORT_SIDE = 256
CROP = 224
JITTER = (256, 320)
JPEG_QUALITY = 90
TRAIN_CLIPS, EVAL_VIEWS = 2, 10

# The videos: Kinetics clips are 10 s, mostly 30 fps, stored at 340x256 (the resized release) or 360p.
SIZES = ((340, 256), (640, 360))
# x264 rate cap (VBV, kbit/s) per size: the grain below would push 640x360 to ~1.5 Mbit/s at crf 18, above what
# YouTube serves at 360p; decode cost grows with the bitrate, so an uncapped file would flatter the shards.
MAX_KBPS = {(340, 256): 500, (640, 360): 750}
FPS = 30
SEED = 0
# One class per video, cycling: a scrolling scene, a bouncing, a pulsing and a wobbling object.
VIDEO_CLASSES = (0, 3, 7, 8)
# YouTube encodes put a keyframe every 2-5 s; x264's default (250 frames) would be 8.3 s here.
KEYINT = 90
# Sensor-like Gaussian noise (standard deviation, 8-bit levels) added before encoding: the rendered scenes
# are smooth and would compress to ~150-200 kbit/s, far below real footage; with it (and the cap above) the
# files land at ~450 kbit/s at 340x256 and ~800 kbit/s at 640x360.
GRAIN = 4.0
LOADER_CLIPS = 4  # train clips per video in the loader's shards: 16 clips per shard with 4 videos
LOADER_BATCH = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the videos ----------------------------------------------------------------------------------------------


def make_videos(
    folder: Path, width: int, height: int, count: int, seconds: float, keyint: int, grain: float
) -> list[Path]:
    """`count` H.264 videos at width x height, rendered by the synth module; reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        class_index = VIDEO_CLASSES[i % len(VIDEO_CLASSES)]
        cap = MAX_KBPS.get((width, height), 0)
        path = folder / f"{width}x{height}_{seconds:g}s_{FPS}fps_g{keyint}_n{grain:g}_max{cap}k_{i}.mp4"
        if not path.is_file():
            started = time.perf_counter()
            spec = sample_video(SEED, class_index, i, width=width, height=height, fps=FPS, seconds=seconds)
            rng = np.random.default_rng([SEED, i, width, height])
            frames = (_grain(chunk, rng, grain) for chunk in iter_frames(spec))
            partial = path.with_name(path.stem + ".partial.mp4")
            kbps = MAX_KBPS.get((width, height))
            rate = {"maxrate": f"{kbps}k", "bufsize": f"{2 * kbps}k"} if kbps else {}
            encode_video(partial, frames, spec.fps, options={"g": str(keyint), **rate})
            os.replace(partial, path)
            log(f"  video {path.name}: {CLASSES[class_index].label}, {time.perf_counter() - started:.1f}s")
        paths.append(path)
    return paths


def _grain(chunk: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    if not sigma:
        return chunk
    noise = rng.standard_normal(chunk.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(chunk + noise + np.float32(0.5), 0, 255).astype(np.uint8)


def describe_videos(paths: list[Path]) -> dict:
    """Bitrate, and the keyframe interval as the files hold it."""
    kbps, gaps = [], []
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            keys = [float(p.pts * stream.time_base) for p in container.demux(stream) if p.is_keyframe]
            seconds = float(stream.duration * stream.time_base)
        kbps.append(path.stat().st_size * 8 / seconds / 1e3)
        gaps += list(np.diff(keys))
    return {"kbit_per_s": round(statistics.mean(kbps)), "keyframe_every_s": round(statistics.median(gaps), 2)}


def video_task(path: Path, label: int = 0) -> Task:
    st = path.stat()
    return Task(video_id=path.stem, label=label, rel=path.name, size=st.st_size, etag=str(st.st_mtime_ns))


def shard_meta(frame_format: str) -> ShardMeta:
    return ShardMeta(
        dataset="bench",
        split="train",
        class_names=[c.label for c in CLASSES],
        T=T,
        alpha=ALPHA,
        tau=TAU,
        target_fps=TARGET_FPS,
        short_side=SHORT_SIDE,
        frame_format=frame_format,
        jpeg_quality=JPEG_QUALITY,
    )


def preprocess_one(path: Path, meta: ShardMeta, mode: str, num_clips: int, out: Path | None) -> pa.Table:
    """One video through the preprocess code path: decode_video (VideoReader, one thread) -> table -> shard."""
    rows, _ = decode_video(
        str(path), video_task(path), meta, mode=mode, num_clips=num_clips, seed=SEED, max_pixels=DEFAULT_MAX_PIXELS
    )
    table = clips_to_table(rows, meta)
    if out is not None:
        write_shard(table, str(out))
    return table


def write_loader_shard(paths: list[Path], frame_format: str, out: Path) -> Path:
    meta = shard_meta(frame_format)
    tables = [preprocess_one(p, meta, "train", LOADER_CLIPS, None) for p in paths]
    write_shard(pa.concat_tables(tables), str(out))
    return out


# -- a. loaders ----------------------------------------------------------------------------------------------


class ShardLoader:
    """Ours: one long-running iter_clips, as a training epoch runs it; each call takes the next `clips`.

    The shard is listed once per call (and once more for the check before timing), so the transform, its
    buffers and Arrow's memory pool are warm, as they are a few batches into an epoch. With `inputs`, each
    batch also goes through clip_inputs on this CPU: the device's share, where the device is the CPU.
    """

    def __init__(self, path: Path, clips: int, calls: int, batch: int, inputs: bool = False):
        self.batches = clips // batch
        self.inputs = inputs
        self.stream = iter_clips([str(path)] * (calls + 1), mode="train", batch_size=batch, crop=CROP, jitter=JITTER)

    def __call__(self) -> int:
        clips = 0
        for _ in range(self.batches):
            batch = next(self.stream)
            clips += len(batch["label"])
            if self.inputs:
                clip_inputs(batch, torch.channels_last_3d)
            del batch  # let the transform reuse the batch's memory, as a training step does
        return clips


class JpegBound:
    """Only the JPEG decodes of the same clips (already in memory): what a JPEG loader cannot beat."""

    def __init__(self, path: Path):
        table = pq.read_table(str(path), columns=["frames", "height", "width"])
        self.clips = table.column("frames").to_pylist()
        height, width = table.column("height")[0].as_py(), table.column("width")[0].as_py()
        self.out = np.empty((FAST, height, width, 3), np.uint8)

    def __call__(self) -> int:
        for frames in self.clips:
            for i, buf in enumerate(frames):
                simplejpeg.decode_jpeg(buf, colorspace="RGB", buffer=self.out[i])
        return len(self.clips)


class OnTheFly:
    """The reference's steps per clip, cheaply: open, seek to a random window, decode to its end, convert the
    32 sampled frames (resized to short side 256 in YUV), then the shard path's ClipTransform on the decoded
    frames (a raw-format row: the same crop, flip and output as the shard path, with no JPEG decode)."""

    def __init__(self, videos: list[Path], clips: int, seed: int):
        self.videos, self.clips = [str(v) for v in videos], clips
        self.rng = np.random.default_rng(seed)
        self.slow_index = slow_indices(ALPHA, T)
        self.transform = ClipTransform(shard_meta("raw"), "train", CROP, jitter=JITTER, seed=seed)

    def __call__(self) -> int:
        for c in range(self.clips):
            path = self.videos[c % len(self.videos)]
            with VideoReader(path, threads=1) as reader:
                (plan,) = plan_clips(
                    reader.info.frames_at(TARGET_FPS),
                    T=T,
                    tau=TAU,
                    alpha=ALPHA,
                    mode="train",
                    num_clips=1,
                    seed=int(self.rng.integers(2**63)),
                    video_id=path,
                )
                (frames,) = reader.decode_windows([plan.times(TARGET_FPS)], short_side=SHORT_SIDE)
            self.transform(
                {
                    "video_id": [path],
                    "label": [0],
                    "clip_index": [0],
                    "height": [frames.shape[1]],
                    "width": [frames.shape[2]],
                    "frames": [frames],
                    "slow_index": [self.slow_index],
                }
            )
        return self.clips


class PySlowFast:
    """PySlowFast's Kinetics loader (pyav backend, train mode), step for step, on one thread: seek to the
    window (1024-tick margin), decode, convert every frame of the window at source size, sample 32 with
    linspace, normalise in float, resize the short side to a random scale, random crop, flip, pack."""

    def __init__(self, videos: list[Path], clips: int, batch: int, seed: int):
        self.videos, self.clips, self.batch = [str(v) for v in videos], clips, batch
        self.rng = np.random.default_rng(seed)
        self.mean = torch.tensor(transforms.MEAN)
        self.std = torch.tensor(transforms.STD)
        self.fast = torch.empty((batch, 3, FAST, CROP, CROP))
        self.slow = torch.empty((batch, 3, T, CROP, CROP))

    def decode(self, path: str) -> torch.Tensor:
        container = av.open(path)
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate)
        frames_length, duration = stream.frames, stream.duration
        clip_size = TAU / ALPHA * FAST / TARGET_FPS * fps  # DATA.SAMPLING_RATE * DATA.NUM_FRAMES
        start_idx = self.rng.uniform(0, max(frames_length - clip_size, 0))
        end_idx = start_idx + clip_size - 1
        timebase = duration / frames_length
        start_pts, end_pts = int(start_idx * timebase), int(end_idx * timebase)
        container.seek(max(start_pts - 1024, 0), any_frame=False, backward=True, stream=stream)
        window = {}
        for frame in container.decode(stream):
            if frame.pts < start_pts:
                continue
            window[frame.pts] = frame
            if frame.pts > end_pts:  # buffer_size 0: the first frame past the end is kept, then stop
                break
        container.close()
        frames = torch.as_tensor(np.stack([window[pts].to_rgb().to_ndarray() for pts in sorted(window)]))
        index = torch.linspace(0, frames.shape[0] - 1, FAST).clamp(0, frames.shape[0] - 1).long()
        return torch.index_select(frames, 0, index)

    def __call__(self) -> int:
        for c in range(self.clips):
            frames = self.decode(self.videos[c % len(self.videos)])
            frames = (frames.float() / 255.0 - self.mean) / self.std  # tensor_normalize
            frames = frames.permute(3, 0, 1, 2)
            size = int(round(self.rng.uniform(*JITTER)))  # random_short_side_scale_jitter
            height, width = frames.shape[2:]
            if width <= height:
                new_h, new_w = int(math.floor(height / width * size)), size
            else:
                new_h, new_w = size, int(math.floor(width / height * size))
            frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)
            y = int(self.rng.integers(0, new_h - CROP)) if new_h > CROP else 0  # random_crop
            x = int(self.rng.integers(0, new_w - CROP)) if new_w > CROP else 0
            frames = frames[:, :, y : y + CROP, x : x + CROP]
            if self.rng.uniform() < 0.5:  # horizontal_flip
                frames = frames.flip(-1)
            index = torch.linspace(0, frames.shape[1] - 1, frames.shape[1] // ALPHA).long()  # pack_pathway
            i = c % self.batch
            self.slow[i].copy_(torch.index_select(frames, 1, index))
            self.fast[i].copy_(frames)  # the DataLoader's collate
        return self.clips


def bench_loader(args, videos: list[Path], shards: dict[str, Path]) -> dict:
    clips = len(videos) * LOADER_CLIPS  # in one shard, and per call of every case
    batch = min(LOADER_BATCH, clips)
    calls = 1 + 1 + args.repeats  # the check below, the warm-up, the timed calls
    cases = {
        "ours_jpeg": ShardLoader(shards["jpeg"], clips, calls, batch),
        "ours_raw": ShardLoader(shards["raw"], clips, calls, batch),
        "ours_jpeg_inputs": ShardLoader(shards["jpeg"], clips, calls, batch, inputs=True),
        "jpeg_bound": JpegBound(shards["jpeg"]),
        "on_the_fly": OnTheFly(videos, clips, seed=1),
        "pyslowfast": PySlowFast(videos, max(1, clips // 2), batch, seed=2),  # the slowest by far: fewer clips
    }
    for name, case in cases.items():
        if name.startswith("ours") and case() != clips // batch * batch:
            raise RuntimeError(f"{name}: the shard gave fewer clips than the {clips} it should hold")
    timings = time_interleaved(cases, repeats=args.repeats, warmup=1)
    counts = {name: clips // batch * batch for name in cases if name.startswith("ours")}
    counts |= {"jpeg_bound": clips, "on_the_fly": cases["on_the_fly"].clips, "pyslowfast": cases["pyslowfast"].clips}
    out = {name: _per_second(timing, counts[name]) for name, timing in timings.items()}
    return out | {"clips_per_call": clips, "batch": batch}


def _per_second(timing, items: int) -> dict:
    cpu, wall = statistics.median(timing.cpu), statistics.median(timing.wall)
    return {
        "per_s_cpu": items / cpu,
        "per_s_wall": items / wall,
        "cpu_s": [round(t, 4) for t in timing.cpu],
        "wall_s": [round(t, 4) for t in timing.wall],
    }


# -- b. preprocess -------------------------------------------------------------------------------------------


def decode_all(path: Path, rgb: str | None = "plain") -> int:
    """Every frame of the video through the decoder, one thread, and to RGB at source size (the baselines).
    rgb "plain": PyAV's frame.to_ndarray(format="rgb24"), which builds a new swscale context for every frame;
    "kept": one VideoReformatter converts them all (its context built once, as VideoReader keeps its own), the
    fastest full decode to RGB this repo knows; None: converted to nothing, what any preprocessing that reads
    the whole video pays before it touches a pixel."""
    n = 0
    reformatter = VideoReformatter() if rgb == "kept" else None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if reformatter is not None:
                reformatter.reformat(frame, format="rgb24").to_ndarray()
            elif rgb == "plain":
                frame.to_ndarray(format="rgb24")
            n += 1
    return n


def decode_eval_views(path: Path) -> int:
    """The eval views' decoding alone: preprocess's one forward pass (`cut_clips` on a one-thread
    VideoReader, frames to RGB at short side 256), without the JPEG encodes. Separates what the one
    pass costs against a full decode from what encoding the views' distinct frames adds. Each frame
    is dropped once converted, as preprocess drops it once encoded (holding all of them would time
    the page faults of ~250 fresh frames too)."""
    sampling = ClipSampling(
        T=T,
        tau=TAU,
        alpha=ALPHA,
        target_fps=TARGET_FPS,
        short_side=SHORT_SIDE,
        mode="eval",
        num_clips=EVAL_VIEWS,
        seed=SEED,
    )
    with VideoReader(str(path), max_pixels=DEFAULT_MAX_PIXELS, threads=1) as reader:
        return len(cut_clips(reader, sampling, encode=lambda rgb: None).frames)


def bench_preprocess(args, videos: list[Path], scratch: Path) -> dict:
    meta = shard_meta("jpeg")
    scratch.mkdir(parents=True, exist_ok=True)

    def ours(mode: str, num_clips: int):
        return lambda: [preprocess_one(v, meta, mode, num_clips, scratch / f"{mode}-{v.stem}.parquet") for v in videos]

    distinct: dict[Path, int] = {}  # each video's distinct eval frames, as the timed passes count them

    def eval_decode():
        distinct.update((v, decode_eval_views(v)) for v in videos)

    cases = {
        "train": ours("train", TRAIN_CLIPS),
        "eval": ours("eval", EVAL_VIEWS),
        "decode_all": lambda: [decode_all(v) for v in videos],
        "eval_decode": eval_decode,
        "decode_all_kept": lambda: [decode_all(v, rgb="kept") for v in videos],
        "decode_only": lambda: [decode_all(v, rgb=None) for v in videos],
    }
    timings = time_interleaved(cases, repeats=args.repeats, warmup=1)
    out = {}
    for name, timing in timings.items():
        out[name] = {
            "s_per_video_cpu": statistics.median(timing.cpu) / len(videos),
            "s_per_video_wall": statistics.median(timing.wall) / len(videos),
        }
    out["eval_decode"]["distinct_frames_per_video"] = statistics.mean(distinct.values())
    return out


# -- c. bytes ------------------------------------------------------------------------------------------------


def shard_bytes(path: Path) -> dict:
    rows = pq.ParquetFile(str(path)).metadata.num_rows
    return {"bytes_per_clip": path.stat().st_size / rows, "clips": rows, "file_bytes": path.stat().st_size}


# -- d. Ray Data ---------------------------------------------------------------------------------------------


def ray_dataset(folder: Path, videos: list[Path], count: int) -> Path:
    """A Kinetics-layout folder of `count` videos (hard links to `videos`, cycling) and its annotations."""
    if folder.exists():
        shutil.rmtree(folder)
    label = "bench"
    (folder / "train" / label).mkdir(parents=True)
    (folder / "annotations").mkdir()
    rows = []
    for i in range(count):
        youtube_id = f"bench{i:06d}"
        target = folder / "train" / label / f"{youtube_id}_000000_000010.mp4"
        try:
            os.link(videos[i % len(videos)], target)
        except OSError:
            shutil.copyfile(videos[i % len(videos)], target)
        rows.append(f"{label},{youtube_id},0,10,train")
    header = "label,youtube_id,time_start,time_end,split"
    (folder / "annotations" / "train.csv").write_text("\n".join([header] + rows) + "\n")
    (folder / "annotations" / "val.csv").write_text(header + "\n")
    return folder


def ray_config(root: Path, storage: Path, videos_per_shard: int):
    from pipelines.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "name": "bench-data",
            "storage_root": str(storage),
            "data": {
                "dataset": "bench",
                "format": "kinetics_csv",
                "video_root": str(root),
                "annotations": {"train": str(root / "annotations/train.csv"), "val": str(root / "annotations/val.csv")},
            },
            "preprocess": {
                "target_fps": TARGET_FPS,
                "short_side": SHORT_SIDE,
                "clips_per_video": TRAIN_CLIPS,
                "eval_views": EVAL_VIEWS,
                "frame_format": "jpeg",
                "jpeg_quality": JPEG_QUALITY,
                "rows_per_shard": TRAIN_CLIPS * videos_per_shard,
                "commit_every": 1,
                "seed": SEED,
            },
            "model": {"preset": "slowfast_8x8_r50"},
        }
    )


def bench_ray(args, videos: list[Path], workdir: Path) -> dict:
    """The preprocess job (ingest, then preprocess_split: what run_preprocess does per split) on a fresh local
    Ray of 1 CPU, then of 2; the actor pool takes one actor per CPU.

    Two figures each: end to end (preprocess_split's wall time, actor start-up included), and steady state:
    videos per second between the first and the last record to come back. With commit_every 1 the job
    commits, and calls `log`, as records arrive, which times them without touching the job.
    """
    import ray

    from pipelines.data import run_ingest, storage_of
    from pipelines.preprocess import preprocess_split

    root = ray_dataset(workdir / "ray" / "videos", videos, args.ray_videos)
    per_shard = args.ray_videos_per_shard
    out = {"videos": args.ray_videos, "videos_per_shard": per_shard}
    for workers in (1, 2):
        storage = workdir / "ray" / f"storage-{workers}"
        if storage.exists():
            shutil.rmtree(storage)
        cfg = ray_config(root, storage, per_shard)
        arrivals: list[float] = []
        load = os.getloadavg()[0]
        with _quiet_ray(), ActorCores(0.1, only_new=True, clock=time.perf_counter) as actor_cpu:
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                logging.getLogger("ray.data").setLevel(logging.ERROR)
                plan = run_ingest(cfg, log=lambda *_: None)
                started = time.perf_counter()
                split = preprocess_split(
                    cfg,
                    storage_of(cfg),
                    plan,
                    "train",
                    run_id=f"bench-{workers}",
                    log=lambda *_, arrivals=arrivals: arrivals.append(time.perf_counter()),
                )
                wall = time.perf_counter() - started
            finally:
                ray.shutdown()
        if split["processed"] != args.ray_videos:
            raise RuntimeError(
                f"ray, {workers} worker(s): {split['processed']} of {args.ray_videos} videos "
                f"processed ({split['quarantine_reasons']})"
            )
        # The workers start together, so the first `workers` batches were decoded before the first arrival
        # (give or take); everything after it came in between the first and the last arrival.
        after_first = args.ray_videos - workers * per_shard
        span = arrivals[-1] - arrivals[0] if arrivals else 0.0
        # Fewer than 4 batches after the first ones (a --quick run) say nothing about a steady state.
        steady = after_first / span if after_first >= 4 * per_shard and span > 0 else None
        out[workers] = {
            "wall_s": round(wall, 2),
            "videos_per_s": args.ray_videos / wall,
            "steady_videos_per_s": steady,
            "first_arrival_s": round(arrivals[0] - started, 2),
            "arrivals_s": [round(t - started, 2) for t in arrivals],
            "clips": split["clips"],
            "actors": actor_cpu.processes("actor"),
            "load_average_before": round(load, 2),
            "actor_started_s": sorted(round(t - started, 2) for t in actor_cpu.first_seen.values()),
        }
        # Between the first and the last arrival: the cores the actors got, and how busy the machine was.
        out[workers].update(actor_cpu.between(arrivals[0], arrivals[-1]) if arrivals else {})
        log(
            f"  ray {workers} worker(s): {args.ray_videos} videos in {wall:.1f}s, the first back after "
            f"{arrivals[0] - started:.1f}s; then {actor_cpu.processes('actor')} actor(s) on "
            f"{out[workers].get('actor_cores')} cores, the machine on {out[workers].get('machine_busy_cores')}"
        )
    return out


class ActorCores(CoreUse):
    """CoreUse for the preprocess job's Ray Data map actors."""

    ROLES = {"actor": (b"ray::MapWorker",)}


@contextlib.contextmanager
def _quiet_ray():
    """Keep Ray's own C++ warnings (actor restart notes) off the benchmark's output."""
    saved = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        else:
            os.environ["RAY_BACKEND_LOG_LEVEL"] = saved


# -- the table -----------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _x(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:.{digits}f}x"


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def summary_rows(results: dict) -> list[list]:
    rows = []
    loader = results.get("loader", {})
    goals = {"340x256": ">= 2.5x", "640x360": ">= 5x"}
    for size, r in loader.items():
        base = r["on_the_fly"]["per_s_cpu"]
        rows.append(
            [
                "a. loader clips/s/core, JPEG shards vs on the fly",
                size,
                _f(r["ours_jpeg"]["per_s_cpu"]),
                _f(base),
                _x(ratio(r["ours_jpeg"]["per_s_cpu"], base)),
                goals.get(size),
            ]
        )
    for size, r in loader.items():
        base = r["on_the_fly"]["per_s_cpu"]
        rows.append(
            [
                "a. loader clips/s/core, raw shards vs on the fly",
                size,
                _f(r["ours_raw"]["per_s_cpu"]),
                _f(base),
                _x(ratio(r["ours_raw"]["per_s_cpu"], base)),
                None,
            ]
        )
    for size, r in loader.items():
        base, ours = r["pyslowfast"]["per_s_cpu"], r["ours_jpeg_inputs"]["per_s_cpu"]
        rows.append(
            [
                "a. loader + clip_inputs clips/s/core, JPEG shards vs PySlowFast's steps",
                size,
                _f(ours),
                _f(base),
                _x(ratio(ours, base)),
                None,
            ]
        )
    for size, r in loader.items():
        bound = r["jpeg_bound"]["per_s_cpu"]
        rows.append(
            [
                "a. JPEG loader vs JPEG-decode bound (fraction reached)",
                size,
                _f(r["ours_jpeg"]["per_s_cpu"]),
                _f(bound),
                _f(ratio(r["ours_jpeg"]["per_s_cpu"], bound), 2),
                ">= 0.80",
            ]
        )
    for size, r in loader.items():
        bound = r["jpeg_bound"]["per_s_cpu"]
        ours = r["ours_jpeg_inputs"]["per_s_cpu"]
        rows.append(
            [
                "a. JPEG loader + clip_inputs on this CPU vs JPEG-decode bound",
                size,
                _f(ours),
                _f(bound),
                _f(ratio(ours, bound), 2),
                None,
            ]
        )
    for size, r in results.get("preprocess", {}).items():
        for key, baseline in (
            ("decode_all_kept", "a full decode to RGB (kept swscale context)"),
            ("decode_all", "PyAV's plain to_ndarray decode"),
        ):
            base = r[key]["s_per_video_cpu"] * 1e3
            for mode, what in (("train", f"train, K = {TRAIN_CLIPS}"), ("eval", f"eval, {EVAL_VIEWS} views")):
                ours = r[mode]["s_per_video_cpu"] * 1e3
                rows.append(
                    [
                        f"b. preprocess ms/video/core, {what}, vs {baseline}",
                        size,
                        _f(ours, 0),
                        _f(base, 0),
                        _f(ratio(ours, base), 2),
                        "<= 1.0" if key == "decode_all_kept" else None,
                    ]
                )
        if "eval_decode" in r:
            ours, base = r["eval_decode"]["s_per_video_cpu"] * 1e3, r["decode_all_kept"]["s_per_video_cpu"] * 1e3
            rows.append(
                [
                    f"b. eval, {EVAL_VIEWS} views: their decoding alone (no JPEG encode) vs a full decode to "
                    "RGB (kept)",
                    size,
                    _f(ours, 0),
                    _f(base, 0),
                    _f(ratio(ours, base), 2),
                    None,
                ]
            )
    for size, r in results.get("bytes", {}).items():
        jpeg, raw = r["jpeg"]["bytes_per_clip"] / 1e3, r["raw"]["bytes_per_clip"] / 1e3
        rows.append(
            [
                f"c. kB/clip, JPEG q{JPEG_QUALITY} vs raw",
                size,
                _f(jpeg, 0),
                _f(raw, 0),
                _f(ratio(jpeg, raw, 4), 3),
                None,
            ]
        )
    ray_result = results.get("ray")
    if ray_result:
        one, two = ray_result[1], ray_result[2]
        rows.append(
            [
                "d. Ray Data preprocess videos/s, steady state, 2 workers vs 1",
                "both",
                _f(two["steady_videos_per_s"], 2),
                _f(one["steady_videos_per_s"], 2),
                _x(ratio(two["steady_videos_per_s"], one["steady_videos_per_s"])),
                None,
            ]
        )
        rows.append(
            [
                "d. Ray Data preprocess videos/s, end to end, 2 workers vs 1",
                "both",
                _f(two["videos_per_s"], 2),
                _f(one["videos_per_s"], 2),
                _x(ratio(two["videos_per_s"], one["videos_per_s"])),
                None,
            ]
        )
    return rows


def notes(results: dict, args) -> str:
    lines = []
    if "videos" in results:
        desc = ", ".join(f"{size} {v['kbit_per_s']} kbit/s" for size, v in results["videos"].items())
        caps = ", ".join(f"{_size(s)} {k}" for s, k in MAX_KBPS.items())
        lines.append(
            f"Videos: {args.videos} per size, {args.seconds:g} s at {FPS} fps, H.264 (x264 veryfast crf 18 "
            f"capped at {caps} kbit/s, a keyframe every {args.keyint} frames),\nGaussian grain of "
            f"{args.grain:g} levels before encoding; as written: {desc}."
        )
    lines.append(
        f"Clips: T {T}, tau {TAU}, alpha {ALPHA} ({FAST} frames over {T * TAU}), short side {SHORT_SIDE}, "
        f"train crop {CROP} from [{JITTER[0]}, {JITTER[1]}] with flips; out: uint8 fast frames (THWC "
        "crop boxes, not yet\nresized) and the slow indices, as the trainer reads them. clip_inputs (flip "
        "and resize of the box, slow pathway by index, normalise,\nchannels_last_3d) is the device's share: "
        "with it the figure is what a CPU trainer's core does; on a GPU it runs there."
    )
    for size, r in results.get("loader", {}).items():
        ms = {name: 1e3 / r[name]["per_s_cpu"] for name in ("jpeg_bound", "ours_jpeg", "ours_jpeg_inputs")}
        lines.append(
            f"  {size}, CPU ms per clip: JPEG decodes {ms['jpeg_bound']:.1f}, loader {ms['ours_jpeg']:.1f} "
            f"(the box's copy, Arrow and the rest: {ms['ours_jpeg'] - ms['jpeg_bound']:.1f}), "
            f"clip_inputs on this CPU {ms['ours_jpeg_inputs'] - ms['ours_jpeg']:.1f}."
        )
    for size, r in results.get("preprocess", {}).items():
        if "eval_decode" not in r:
            continue
        ms = {k: r[k]["s_per_video_cpu"] * 1e3 for k in ("eval", "eval_decode", "decode_all_kept")}
        frames = r["eval_decode"]["distinct_frames_per_video"]
        lines.append(
            f"  {size}, eval views, CPU ms per video: the one decoding pass {ms['eval_decode']:.0f} (a full "
            f"decode {ms['decode_all_kept']:.0f}); the JPEG encodes of its {frames:.0f} distinct frames "
            f"and the rows {ms['eval'] - ms['eval_decode']:.0f}, "
            f"{(ms['eval'] - ms['eval_decode']) / frames:.2f} a frame."
        )
        if "decode_only" in r:
            # The floor of any eval preprocessing that reads the whole video and JPEG-encodes the views' frames as
            # these encodes do: the decoder alone (every conversion free) plus the encodes.
            alone = r["decode_only"]["s_per_video_cpu"] * 1e3
            floor = (alone + ms["eval"] - ms["eval_decode"]) / ms["decode_all_kept"]
            lines.append(
                f"  {size}, the decoder alone (no conversion) {alone:.0f} ms: with conversions free, the "
                f"decoder and these encodes would still be {floor:.2f}x the full decode."
            )
    lines.append(
        "Per core: one thread everywhere, CPU seconds of the process (wall-clock figures are in the JSON). "
        "On the fly: VideoReader\n+ the shard path's transforms per clip; PySlowFast's steps: its pyav "
        "decoder and spatial_sampling, re-implemented step for step."
    )
    if "ray" in results:
        r = results["ray"]
        lines.append(
            f"Ray: {r['videos']} videos (both sizes), {r['videos_per_shard']} per actor batch, train K = "
            f"{TRAIN_CLIPS}, on a fresh local Ray with num_cpus 1, then 2. End to end: preprocess_split's "
            "wall time;\nsteady state: videos/s from the first record back to the last."
        )
        for workers in (1, 2):
            w = r[workers]
            lines.append(
                f"  {workers} worker(s): first record after {w['first_arrival_s']} s, actors started at "
                f"{', '.join(f'{t:g}' for t in w['actor_started_s']) or '?'} s; from the first record on, the "
                f"actors got {w.get('actor_cores', '?')} cores, the machine was busy on "
                f"{w.get('machine_busy_cores', '?')} of {os.cpu_count()}."
            )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench data", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="a,b,c,d", help="which parts to run, comma separated (default a,b,c,d)")
    parser.add_argument("--quick", action="store_true", help="fewest videos and repeats: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "slowfast-bench-data",
        help="videos (kept between runs) and shards (rewritten) go here",
    )
    parser.add_argument("--videos", type=int, default=None, help="videos per size (default 4, quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="video length (default 10, quick 4)")
    parser.add_argument("--keyint", type=int, default=KEYINT, help=f"frames between keyframes (default {KEYINT})")
    parser.add_argument("--grain", type=float, default=GRAIN, help=f"noise before encoding (default {GRAIN:g})")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per case (default 5, quick 1)")
    parser.add_argument("--ray-videos", type=int, default=None, help="videos in the Ray job (default 64, quick 8)")
    parser.add_argument("--ray-videos-per-shard", type=int, default=2, help="videos per actor batch (default 2)")
    args = parser.parse_args(argv)
    args.only = {p.strip() for p in args.only.split(",") if p.strip()}
    if not args.only or not args.only <= set("abcd"):
        parser.error(f"--only takes parts among a, b, c, d; got {','.join(sorted(args.only)) or 'nothing'}")
    quick = args.quick
    args.videos = args.videos or (1 if quick else 4)
    args.seconds = args.seconds or (4.0 if quick else 10.0)
    args.repeats = args.repeats or (1 if quick else 5)
    args.ray_videos = args.ray_videos or (8 if quick else 64)
    if args.seconds * FPS < T * TAU:
        parser.error(f"--seconds {args.seconds:g}: a clip spans {T * TAU} frames, so at least {T * TAU / FPS:.2f} s")
    if min(args.videos, args.repeats, args.ray_videos, args.ray_videos_per_shard, args.keyint) < 1:
        parser.error("--videos, --repeats, --ray-videos, --ray-videos-per-shard and --keyint must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    workdir = args.workdir
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results: dict = {}

    log(f"bench data: videos in {workdir / 'videos'}")
    videos = {
        _size(s): make_videos(workdir / "videos", *s, args.videos, args.seconds, args.keyint, args.grain) for s in SIZES
    }
    results["videos"] = {size: describe_videos(paths) for size, paths in videos.items()}

    if args.only & {"a", "c"}:
        shards = {}
        for size, paths in videos.items():
            shards[size] = {
                fmt: write_loader_shard(paths, fmt, workdir / "shards" / f"{size}-{fmt}.parquet")
                for fmt in ("jpeg", "raw")
            }
        if "c" in args.only:
            results["bytes"] = {size: {fmt: shard_bytes(p) for fmt, p in s.items()} for size, s in shards.items()}
        if "a" in args.only:
            results["loader"] = {}
            for size, paths in videos.items():
                log(f"a. loader, {size}")
                results["loader"][size] = bench_loader(args, paths, shards[size])
    if "b" in args.only:
        results["preprocess"] = {}
        for size, paths in videos.items():
            log(f"b. preprocess, {size}")
            results["preprocess"][size] = bench_preprocess(args, paths, workdir / "scratch")
    if "d" in args.only:
        log("d. Ray Data")
        mixed = [v for pair in zip(*videos.values(), strict=False) for v in pair]
        results["ray"] = bench_ray(args, mixed, workdir)

    load = max(load_before, os.getloadavg()[0])
    title = (
        f"Data path: {_size(SIZES[0])} and {_size(SIZES[1])} H.264 sources, slowfast_8x8_r50 clips; "
        f"{args.repeats} timed passes per case, alternating, after 1 warm-up"
    )
    table = format_table(["figure", "source", "ours", "baseline", "ratio", "goal"], summary_rows(results))
    note = notes(results, args)
    if load > 1.5:
        note += (
            f"\nLoad average {load:.1f} on {os.cpu_count()} cores: other work shared the machine. CPU-time "
            "figures (a, b) suffer less than wall-clock ones (d) but still\nspread by ~10-20% from run to run; "
            "ratios less, as each pair is timed alternately in one run."
        )
    print(title + "\n" + table + "\n" + note)
    log(f"bench data: {time.perf_counter() - started:.0f}s")
    if args.json:
        payload = {
            "benchmark": "data",
            "environment": environment("cpu"),
            "args": {
                k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
            },
            "load_average_max": round(load, 2),
        }
        payload.update(_jsonable(results))
        write_json(args.json, payload)
        print(f"results written to {args.json}")
    return 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


if __name__ == "__main__":
    sys.exit(main())
