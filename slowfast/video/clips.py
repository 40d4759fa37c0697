"""The one clip path: an open video and a `ClipSampling` in; the clips' frames, plans and the Slow
pathway's indices out. Preprocessing (shards) and serving (predict) both cut their clips here, so
they see the same frames of the same video; `sampling.py` holds the arithmetic, `decode.py` PyAV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from slowfast.video.decode import VideoReader
from slowfast.video.sampling import ClipPlan, plan_clips, slow_indices, temporal_indices

MODES = ("train", "eval")


def positive_seconds(value) -> bool:
    """A usable timeline length: a finite number of seconds above 0 (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class ClipSampling:
    """How clips are cut from a video, in the paper's quantities (frames count target-fps frames)."""

    T: int  # Slow frames per clip
    tau: int  # Slow stride: a clip spans T * tau frames
    alpha: int  # Fast frames per Slow frame: alpha * T Fast frames per clip
    target_fps: float  # the video is resampled to this rate before anything is counted
    short_side: int | None  # frames are resized to it while decoding; None keeps the source size
    mode: str = "eval"  # train: random windows; eval: uniformly spaced views (the test protocol)
    num_clips: int = 1  # random windows (train) or temporal views (eval) per video
    seed: int = 0  # train windows are seeded from (seed, video_id, clip_index)

    def __post_init__(self):
        for name in ("T", "tau", "alpha", "num_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipSampling: {name} must be >= 1, got {getattr(self, name)}")
        if not self.target_fps > 0:
            raise ValueError(f"ClipSampling: target_fps must be > 0, got {self.target_fps}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"ClipSampling: short_side must be >= 1 or None, got {self.short_side}")
        if self.mode not in MODES:
            raise ValueError(f"ClipSampling: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def clip_size(self) -> int:
        """Frames a clip spans."""
        return self.T * self.tau

    def plans(self, num_frames: int, video_id: str = "") -> list[ClipPlan]:
        """The clips of a video of ``num_frames`` target-fps frames (see `sampling.plan_clips`)."""
        return plan_clips(num_frames, T=self.T, tau=self.tau, alpha=self.alpha, mode=self.mode,
                          num_clips=self.num_clips, seed=self.seed, video_id=video_id)

    @property
    def clip_seconds(self) -> float:
        """How long a clip lasts: the default timeline window."""
        return self.clip_size / self.target_fps

    def windows(self, num_frames: int, window_s: float | None = None,
                stride_s: float | None = None) -> list["Window"]:
        """A timeline of a video of ``num_frames`` target-fps frames: windows of ``window_s`` seconds (default
        one clip) every ``stride_s`` (default ``window_s``) from 0, as long as they fit in the video, and a last
        one ending with the video where those stop short of it (a video shorter than a window gets one, to
        its end). Each window is scored by ``round(window_s / clip
        seconds)`` clips (at least 1) centred on equal parts of it, each with the Fast frames an eval view
        would have; a window shorter than a clip gets one clip centred on it, reaching past its edges."""
        window_s = self.clip_seconds if window_s is None else float(window_s)
        stride_s = window_s if stride_s is None else float(stride_s)
        if not (positive_seconds(window_s) and positive_seconds(stride_s)):
            raise ValueError(f"timeline windows need window_s > 0 and stride_s > 0, got {window_s} and {stride_s}")
        duration = num_frames / self.target_fps
        count = max(1, int((duration - window_s) / stride_s + 1e-9) + 1) if duration >= window_s else 1
        starts = [w * stride_s for w in range(count)]
        if duration >= window_s and starts[-1] + window_s < duration - 1e-6:
            starts.append(duration - window_s)  # the tail: a last window ending with the video
        per_window = max(1, round(window_s / self.clip_seconds))
        last_start = max(num_frames - self.clip_size, 0)
        out, clip_index = [], 0
        for w, start_s in enumerate(starts):
            end_s = min(start_s + window_s, duration)
            plans = []
            for i in range(per_window):
                centre = (start_s + (end_s - start_s) * (i + 0.5) / per_window) * self.target_fps
                first = min(max(centre - self.clip_size / 2, 0.0), float(last_start))
                indices = temporal_indices(first, first + self.clip_size - 1, self.alpha * self.T, num_frames)
                plans.append(ClipPlan(clip_index, first, indices, short=first + self.clip_size > num_frames))
                clip_index += 1
            out.append(Window(w, start_s, end_s, tuple(plans)))
        return out


@dataclass(frozen=True)
class Window:
    """A stretch of a video's timeline and the clips that score it."""

    index: int
    start_s: float
    end_s: float
    plans: tuple[ClipPlan, ...]


@dataclass(frozen=True, eq=False)
class VideoClips:
    """The clips cut from one video, each frame stored once.

    ``frames`` holds every distinct frame the clips show, in time order: a (H, W, 3) uint8 array,
    or what `cut_clips`'s ``encode`` made of it. ``rows[i]`` lists the ``alpha * T`` Fast frames of
    clip i as positions in ``frames``; overlapping eval views share theirs.
    """

    sampling: ClipSampling
    plans: list[ClipPlan]
    frames: list
    rows: list[np.ndarray]
    height: int  # of every frame, upright, after the short-side resize
    width: int

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def short(self) -> bool:
        """A clip runs past the end of the video (shorter than one clip): its last frame repeats."""
        return any(p.short for p in self.plans)

    @property
    def slow_index(self) -> np.ndarray:
        """The Slow pathway's frames, as indices into a clip's Fast frames (PackPathway)."""
        return slow_indices(self.sampling.alpha, self.sampling.T)

    def start_sec(self, i: int) -> float:
        return self.plans[i].start_sec(self.sampling.target_fps)

    def items(self, i: int) -> list:
        """Clip i's Fast frames as ``frames`` holds them (arrays, or the encoded frames)."""
        return [self.frames[r] for r in self.rows[i]]

    def clip(self, i: int) -> np.ndarray:
        """Clip i's Fast frames as one (alpha * T, H, W, 3) uint8 array (frames not encoded)."""
        return np.stack(self.items(i))


def cut_clips(reader: VideoReader, sampling: ClipSampling, *, video_id: str = "",
              plans: Sequence[ClipPlan] | None = None,
              encode: Callable[[np.ndarray], Any] | None = None) -> VideoClips:
    """Cut ``sampling``'s clips from the open video (or the given ``plans``, e.g. the clips of
    `ClipSampling.windows`).

    Every distinct frame is decoded once, in one forward pass (`VideoReader.decode_stream`), and
    handed to ``encode`` as soon as it is decoded: a consumer that stores JPEGs keeps only those,
    and encodes a frame shared by overlapping views once.
    """
    if plans is None:
        plans = sampling.plans(reader.info.frames_at(sampling.target_fps), video_id)
    wanted = sorted({int(j) for p in plans for j in p.indices})
    times = [j / sampling.target_fps for j in wanted]  # ClipPlan.times' arithmetic
    frames: list = []
    position: dict[int, int] = {}
    previous = None
    for j, rgb in zip(wanted, reader.decode_stream(times, short_side=sampling.short_side)):
        if rgb is not previous:  # the same array: the same source frame shown at both times
            frames.append(rgb if encode is None else encode(rgb))
            previous = rgb
        position[j] = len(frames) - 1
    rows = [np.array([position[int(j)] for j in p.indices], np.int64) for p in plans]
    height, width = reader.frame_size(sampling.short_side)
    return VideoClips(sampling, list(plans), frames, rows, height, width)
