"""Which frames a clip holds: PySlowFast's clip-window and linspace rules, as pure arithmetic.

Frame numbers here count frames of the video resampled to the target fps (frame j is shown at
j / target_fps seconds); `decode.py` turns them into times and finds the source frames.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np

_f32 = np.float32


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, CPU) bit for bit, without torch.

    Torch computes ``step = (end - start) / (steps - 1)`` in float32, fills the first half as
    ``start + step * i`` and the second half as ``end - step * (steps - 1 - i)``, each a single
    fused multiply-add (its CPU kernels are built with FMA contraction): the exact product and
    sum, rounded once to float32. Float64 holds that product and sum exactly at these
    magnitudes, so one rounding from float64 reproduces it.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s, e = _f32(start), _f32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = _f32((e - s) / _f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + np.float64(step) * i
    second = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def clip_window(num_frames: int, clip_size: float, clip_idx: int, num_clips: int, rng=None) -> tuple[float, float]:
    """PySlowFast's ``get_start_end_idx``: (first, last) frame of a clip, both float.

    ``clip_idx == -1`` draws the start uniformly in [0, num_frames - clip_size] (training);
    otherwise view ``clip_idx`` of ``num_clips`` starts at ``delta * clip_idx / num_clips``,
    the reference default (``DATA.USE_OFFSET_SAMPLING = False``). The last view therefore
    ends ``delta / num_clips`` frames before the end of the video, as in the reference.
    """
    delta = max(num_frames - clip_size, 0)
    if clip_idx == -1:
        if rng is None:
            raise ValueError("a random clip (clip_idx=-1) needs an rng")
        start = rng.uniform(0, delta)
    else:
        if not 0 <= clip_idx < num_clips:
            raise ValueError(f"clip_idx {clip_idx} is outside 0..{num_clips - 1}")
        start = delta * clip_idx / num_clips
    return start, start + clip_size - 1


def temporal_indices(start: float, end: float, num_samples: int, num_frames: int) -> np.ndarray:
    """PySlowFast's ``temporal_sampling`` indices: linspace, clamp to the video, truncate.

    The reference computes ``torch.linspace(start, end, n).clamp(0, num_frames - 1).long()``
    in float32; the result here is identical (``tests/test_sampling.py`` checks it with torch).
    """
    index = torch_linspace_f32(start, end, num_samples)
    index = np.clip(index, _f32(0), _f32(num_frames - 1))
    return index.astype(np.int64)  # truncation toward zero, like Tensor.long()


def slow_indices(alpha: int, T: int) -> np.ndarray:
    """The Slow pathway's frames as indices into the ``alpha * T`` Fast frames (PackPathway)."""
    return torch_linspace_f32(0, alpha * T - 1, T).astype(np.int64)


def num_target_frames(duration_sec: float, target_fps: float) -> int:
    """How many target-fps frames a video of ``duration_sec`` has: instants j / target_fps
    inside [0, duration), at least 1. Containers round durations to their own clock (an MP4
    edit list to 1 ms), so an excess under 0.05 frame is rounding, not one more frame."""
    return max(1, math.ceil(duration_sec * target_fps - 0.05))


@dataclass(frozen=True, eq=False)
class ClipPlan:
    """One clip to cut from a video, in target-fps frames."""

    clip_index: int  # which random clip (train) or temporal view (eval)
    start_frame: float  # the window's start, as the reference computes it (may be fractional)
    indices: np.ndarray  # int64, alpha * T Fast frames, clamped to the video
    short: bool  # the video is shorter than one clip: indices were clamped, frames repeat

    def times(self, target_fps: float) -> list[float]:
        """When each Fast frame is shown, in seconds from the first frame of the video."""
        return [int(j) / target_fps for j in self.indices]

    def start_sec(self, target_fps: float) -> float:
        return self.start_frame / target_fps


def clip_seed(seed: int, video_id: str, clip_index: int) -> int:
    """A stable 64-bit seed for one clip (blake2b: the same on every machine and Python run)."""
    digest = hashlib.blake2b(f"{seed}\x00{video_id}\x00{clip_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def plan_clips(
    num_frames: int,
    *,
    T: int,
    tau: int,
    alpha: int,
    mode: str,
    num_clips: int,
    seed: int = 0,
    video_id: str = "",
) -> list[ClipPlan]:
    """The clips to pre-sample from a video of ``num_frames`` target-fps frames.

    A clip spans ``T * tau`` frames (the Slow pathway's T frames at stride tau) and holds the
    ``alpha * T`` Fast frames spread over it. ``mode='train'``: ``num_clips`` random windows,
    each seeded from (seed, video_id, clip_index) so a re-run cuts the same clips;
    ``mode='eval'``: the ``num_clips`` uniform views of the reference test protocol.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    clip_size = T * tau
    num_samples = alpha * T
    short = num_frames < clip_size
    plans = []
    for clip_index in range(num_clips):
        if mode == "train":
            rng = random.Random(clip_seed(seed, video_id, clip_index))
            start, end = clip_window(num_frames, clip_size, -1, num_clips, rng)
        else:
            start, end = clip_window(num_frames, clip_size, clip_index, num_clips)
        indices = temporal_indices(start, end, num_samples, num_frames)
        plans.append(ClipPlan(clip_index, float(start), indices, short))
    return plans


def choose_views(stored: int, wanted: int) -> list[int]:
    """Which `wanted` of a video's `stored` uniformly spaced eval views to score: themselves spread
    uniformly over the stored ones (all when wanted >= stored). The one rule for every evaluation:
    the training run's validation, `evaluate`, the ablations and batch inference."""
    if stored < 1 or wanted < 1:
        raise ValueError(f"stored and wanted views must be >= 1, got {stored} and {wanted}")
    if wanted >= stored:
        return list(range(stored))
    return sorted({round(float(i)) for i in np.linspace(0, stored - 1, wanted)})
