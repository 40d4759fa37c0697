"""The one clip path: an open video and a `ClipSampling` in; the clips' frames, plans and the Slow
pathway's indices out. Preprocessing (shards) and serving (predict) both cut their clips here, so
they see the same frames of the same video; `sampling.py` holds the arithmetic, `decode.py` PyAV.
A timeline's size is capped here too (`TimelineLimits`), from the video's duration, before any decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slowfast.video.decode import VideoReader
from slowfast.video.sampling import ClipPlan, plan_clips, slow_indices, temporal_indices

MODES = ("train", "eval")
# Per video. 1000 windows: the timeline plot is 1000 pixels wide, so more windows than that draw nothing new, and a
# two-hour film still gets one every 7.2 s. 10,000 clips (x spatial crops = views): what scoring 1000 videos with
# the paper's 10-clip test protocol costs, for one request.
MAX_WINDOWS = 1000
MAX_CLIPS = 10_000


def positive_seconds(value) -> bool:
    """A usable timeline length: a finite number of seconds above 0 (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class TimelineLimits:
    """How big one video's timeline may be, checked from its duration before any frame is decoded: the memory
    of scoring no longer grows with it (serving scores in chunks), but time and the answer's size do."""

    max_windows: int = MAX_WINDOWS
    max_clips: int = MAX_CLIPS  # over all windows; each is scored by its clips' views (x spatial crops)

    def __post_init__(self):
        for name in ("max_windows", "max_clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TimelineLimits: {name} must be a whole number >= 1, got {value!r}")


class TimelineLimitError(ValueError):
    """A timeline asking for more than its `TimelineLimits`: ``key`` names the limit, ``asked`` the value the
    request needs, ``limit`` the one allowed; ``problem`` says so without the hint on how to raise it, which
    depends on where the limits were set (a caller rewords it: a model_config key, a flag)."""

    def __init__(self, key: str, asked: int | float, limit: int, problem: str):
        self.key, self.asked, self.limit, self.problem = key, asked, limit, problem
        super().__init__(f"{problem}; or raise TimelineLimits.{key} (the limits= of VideoClassifier.timeline)")


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
        return plan_clips(
            num_frames,
            T=self.T,
            tau=self.tau,
            alpha=self.alpha,
            mode=self.mode,
            num_clips=self.num_clips,
            seed=self.seed,
            video_id=video_id,
        )

    @property
    def clip_seconds(self) -> float:
        """How long a clip lasts: the default timeline window."""
        return self.clip_size / self.target_fps

    def windows(
        self,
        num_frames: int,
        window_s: float | None = None,
        stride_s: float | None = None,
        limits: TimelineLimits | None = None,
    ) -> list[Window]:
        """A timeline of a video of ``num_frames`` target-fps frames: windows of ``window_s`` seconds (default
        one clip) every ``stride_s`` (default ``window_s``) from 0, as long as they fit in the video, and a last
        one ending with the video where those stop short of it. A window longer than the video is clamped to it:
        one window, the whole video (``Window.clamped_from_s`` keeps the length asked). Each window is scored by
        ``round(its length / clip seconds)`` clips (at least 1) centred on equal parts of it, each with the Fast
        frames an eval view would have; a window shorter than a clip gets one clip centred on it, reaching past
        its edges. Refuses (`TimelineLimitError`) a timeline over ``limits`` (default `TimelineLimits()`) from
        the count alone, before building any window."""
        limits = limits or TimelineLimits()
        window_s = self.clip_seconds if window_s is None else float(window_s)
        stride_s = window_s if stride_s is None else float(stride_s)
        if not (positive_seconds(window_s) and positive_seconds(stride_s)):
            raise ValueError(f"timeline windows need window_s > 0 and stride_s > 0, got {window_s} and {stride_s}")
        duration = num_frames / self.target_fps
        clamped = duration < window_s
        length = duration if clamped else window_s
        count, tail = self._window_count(duration, length, stride_s, limits)
        per_window = max(1, round(length / self.clip_seconds))
        if (count + tail) * per_window > limits.max_clips:
            clips = (count + tail) * per_window
            raise TimelineLimitError(
                "max_clips",
                clips,
                limits.max_clips,
                (
                    f"{count + tail:,} window{'s' * (count + tail > 1)} of {length:.3g} s, {per_window:,} "
                    f"clip{'s' * (per_window > 1)} of {self.clip_seconds:.3g} s each, make {clips:,} clips > max_clips "
                    f"{limits.max_clips:,}: ask for shorter windows (window_s) or fewer (a longer stride_s)"
                ),
            )
        starts = [w * stride_s for w in range(count)] + ([duration - length] if tail else [])
        last_start = max(num_frames - self.clip_size, 0)
        out, clip_index = [], 0
        for w, start_s in enumerate(starts):
            end_s = min(start_s + length, duration)
            plans = []
            for i in range(per_window):
                centre = (start_s + (end_s - start_s) * (i + 0.5) / per_window) * self.target_fps
                first = min(max(centre - self.clip_size / 2, 0.0), float(last_start))
                indices = temporal_indices(first, first + self.clip_size - 1, self.alpha * self.T, num_frames)
                plans.append(ClipPlan(clip_index, first, indices, short=first + self.clip_size > num_frames))
                clip_index += 1
            out.append(Window(w, start_s, end_s, tuple(plans), clamped_from_s=window_s if clamped else None))
        return out

    @staticmethod
    def _window_count(duration: float, window_s: float, stride_s: float, limits: TimelineLimits) -> tuple[int, int]:
        """(regular windows, 1 if a tail window ends with the video): counted, not built, and refused over
        ``limits.max_windows`` with the shortest stride this video allows."""
        steps = (duration - window_s) / stride_s  # inf for a stride far below the duration
        if not math.isfinite(steps):
            asked: int | float = steps
        else:
            count = int(steps + 1e-9) + 1
            tail = int((count - 1) * stride_s + window_s < duration - 1e-6)
            if count + tail <= limits.max_windows:
                return count, tail
            asked = count + tail
        shortest = ""
        if limits.max_windows > 2:  # max_windows - 2 strides, then the tail: max_windows windows at most
            shortest = f"; a stride_s of {_round_up((duration - window_s) / (limits.max_windows - 2)):g} s or more fits"
        raise TimelineLimitError(
            "max_windows",
            asked,
            limits.max_windows,
            (
                f"stride_s {stride_s:g} s over {duration:.2f} s in windows of {window_s:.3g} s makes "
                f"{asked:,} windows > "
                f"max_windows {limits.max_windows:,}{shortest}"
            ),
        )


def _round_up(seconds: float) -> float:
    """``seconds`` rounded up to 3 significant digits: a figure to quote that is never below the one computed."""
    if seconds <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(seconds)) - 2)
    return math.ceil(seconds / scale) * scale


@dataclass(frozen=True)
class Window:
    """A stretch of a video's timeline and the clips that score it."""

    index: int
    start_s: float
    end_s: float
    plans: tuple[ClipPlan, ...]
    clamped_from_s: float | None = None  # the length asked, where the video is shorter (the window is all of it)


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


def cut_clips(
    reader: VideoReader,
    sampling: ClipSampling,
    *,
    video_id: str = "",
    plans: Sequence[ClipPlan] | None = None,
    encode: Callable[[np.ndarray], Any] | None = None,
) -> VideoClips:
    """Cut ``sampling``'s clips from the open video (or the given ``plans``, e.g. the clips of
    `ClipSampling.windows`).

    Every distinct frame is decoded once, in one forward pass (`VideoReader.decode_stream`), and
    handed to ``encode`` as soon as it is decoded: a consumer that stores JPEGs keeps only those,
    and encodes a frame shared by overlapping views once.
    """
    if plans is None:
        plans = sampling.plans(reader.info.frames_at(sampling.target_fps), video_id)
    return next(iter_clips(reader, sampling, [plans], encode=encode))


def iter_clips(
    reader: VideoReader,
    sampling: ClipSampling,
    groups: Sequence[Sequence[ClipPlan]],
    *,
    encode: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[VideoClips]:
    """`cut_clips` of each group of plans in turn, all from one forward pass over the open video: the same frames,
    decoded once, as one `cut_clips` of every plan would give.

    A frame is held from when it is decoded until the last group that shows it has been handed out, so with
    groups in time order (successive chunks of a timeline's clips) what is held spans about one group, however
    many there are; the caller drops each group's clips before asking for the next.
    """
    groups = [list(g) for g in groups]
    wanted = [sorted({int(j) for p in g for j in p.indices}) for g in groups]
    last_group = {j: k for k, frames in enumerate(wanted) for j in frames}
    order = sorted(last_group)
    times = [j / sampling.target_fps for j in order]  # ClipPlan.times' arithmetic
    decoded = zip(order, reader.decode_stream(times, short_side=sampling.short_side), strict=False)
    # frame index -> (which distinct source frame, the frame or its encoding): an encoding may be any object, even
    # the same one for two frames (None), so frames are told apart by number, not by what `encode` returned
    held: dict[int, tuple[int, Any]] = {}
    previous = item = None
    source = 0
    height, width = reader.frame_size(sampling.short_side)
    for k, (plans, frames) in enumerate(zip(groups, wanted, strict=True)):
        while frames and frames[-1] not in held:
            j, rgb = next(decoded)
            if rgb is not previous:  # the same array: the same source frame shown at both times
                item, previous = (rgb if encode is None else encode(rgb)), rgb
                source += 1
            held[j] = (source, item)
        items: list = []
        position: dict[int, int] = {}
        shown = None
        for j in frames:
            if held[j][0] != shown:
                shown = held[j][0]
                items.append(held[j][1])
            position[j] = len(items) - 1
        rows = [np.array([position[int(j)] for j in p.indices], np.int64) for p in plans]
        for j in frames:
            if last_group[j] == k:
                del held[j]
        yield VideoClips(sampling, plans, items, rows, height, width)
