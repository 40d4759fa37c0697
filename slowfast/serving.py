"""Classify video files with a trained SlowFast: decode, cut the test views, average the softmax, top-k.

`VideoClassifier` is what `python -m pipelines predict` and the MLflow pyfunc run. It needs torch, PyAV
and numpy only (no Ray, no shards), and cuts exactly the views evaluation reads from the eval shards:
frames resampled to the training frame rate, short side resized as preprocessing did, N uniformly
spaced clips, each scaled to the crop and cut into 1 or 3 spatial crops. It cuts and scores a few clips at
a time (`ClipSpec.iter_views`), so memory does not grow with a timeline's windows.

A registered model wraps it (the MLflow flavor lives in `pipelines.tracking`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slowfast.train import autocast, clip_inputs, memory_format
from slowfast.video import transforms
from slowfast.video.clips import ClipSampling, TimelineLimits, VideoClips, Window, cut_clips, iter_clips
from slowfast.video.decode import DEFAULT_MAX_PIXELS, Source, VideoReader
from slowfast.video.sampling import ClipPlan, slow_indices


@dataclass(frozen=True)
class VideoPlan:
    """The clips to cut from one video: its test views', then each timeline window's."""

    test: list[ClipPlan]
    windows: list[Window]

    @property
    def plans(self) -> list[ClipPlan]:
        """Every clip, in the order `ClipSpec.cut_views` returns their views."""
        return self.test + [p for w in self.windows for p in w.plans]


@dataclass(frozen=True)
class ClipSpec:
    """How a model's test clips are made; saved with the model so any video is cut the same way."""

    T: int
    tau: int
    alpha: int
    target_fps: float
    short_side: int
    crop: int
    temporal_views: int = 10
    spatial_crops: int = 3

    def __post_init__(self):
        if self.spatial_crops not in (1, 3):
            raise ValueError(f"spatial_crops must be 1 or 3, got {self.spatial_crops}")

    @property
    def views(self) -> int:
        return self.temporal_views * self.spatial_crops

    @property
    def sampling(self) -> ClipSampling:
        """The temporal views as the one clip path cuts them (slowfast.video.clips)."""
        return ClipSampling(
            T=self.T,
            tau=self.tau,
            alpha=self.alpha,
            target_fps=self.target_fps,
            short_side=self.short_side,
            mode="eval",
            num_clips=self.temporal_views,
        )

    @property
    def slow_index(self) -> np.ndarray:
        """The Slow pathway's frames, as indices into a view's alpha*T Fast frames (T,)."""
        return slow_indices(self.alpha, self.T)

    def open(self, source: Source, name: str | None = None, max_frames: int | None = None) -> VideoReader:
        """The video as serving reads it: frames up to DCI 4K, one decode thread (callers decode one video per core),
        at most `max_frames` decoded (None: no budget)."""
        return VideoReader(source, name=name, max_pixels=DEFAULT_MAX_PIXELS, threads=1, max_frames=max_frames)

    def plan(
        self,
        num_frames: int,
        *,
        test_views: bool = True,
        windows: bool = False,
        window_s: float | None = None,
        stride_s: float | None = None,
        limits: TimelineLimits | None = None,
    ) -> VideoPlan:
        """The clips of a video of ``num_frames`` frames at target_fps (``reader.info.frames_at(target_fps)``): the
        test views (with `test_views`), and every timeline window's (with `windows`: `ClipSampling.windows`, which
        refuses a timeline over ``limits`` before anything is decoded)."""
        test = self.sampling.plans(num_frames) if test_views else []
        found = self.sampling.windows(num_frames, window_s, stride_s, limits) if windows else []
        return VideoPlan(test, found)

    def views_of(self, clips: VideoClips) -> np.ndarray:
        """The clips' test views as the loader hands them over: uint8 fast frames (views, alpha*T, crop, crop, 3),
        each clip's spatial crops in a row."""
        return np.stack(
            [
                np.ascontiguousarray(view)
                for i in range(len(clips))
                for view in transforms.eval_views(clips.clip(i), self.crop, self.spatial_crops)
            ]
        )

    def iter_views(self, reader: VideoReader, plans: Sequence[ClipPlan], chunk_clips: int) -> Iterator[np.ndarray]:
        """The views of ``plans`` (as `views_of` orders them), ``chunk_clips`` clips at a time, from one forward pass
        over the open video (`iter_clips`): what is held is one chunk's views and the frames they span, however
        many plans. The views of all the chunks, concatenated, are those of one `cut_views`."""
        chunks = [plans[i : i + chunk_clips] for i in range(0, len(plans), chunk_clips)]
        for clips in iter_clips(reader, self.sampling, chunks):
            yield self.views_of(clips)

    def cut_views(self, source: Source, name: str | None = None, *, plans=None) -> tuple[np.ndarray, np.ndarray]:
        """One video's test views, all in memory: uint8 fast frames (views, alpha*T, crop, crop, 3) as `views_of`
        makes them, and the slow pathway's frames as indices into them (T,).
        `plans`: other clips than the temporal views, or a function of the video's frame count (at
        target_fps) returning them (e.g. a timeline's, `ClipSampling.windows`). For a bounded memory, see
        `iter_views`."""
        with self.open(source, name) as reader:
            if callable(plans):
                plans = plans(reader.info.frames_at(self.target_fps))
            clips = cut_clips(reader, self.sampling, plans=plans)
        return self.views_of(clips), self.slow_index


class VideoClassifier:
    """A SlowFast network, its class names and its ClipSpec: video in, class probabilities out."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: Sequence[str],
        spec: ClipSpec,
        device: str | torch.device = "cpu",
        batch_views: int = 12,
        mixed_precision: bool = False,
    ):
        self.model = model.to(device).eval()
        self.mixed_precision = mixed_precision  # bf16 autocast, where the device has it
        self.class_names = list(class_names)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_views = batch_views
        self.max_frames: int | None = None  # frames decoded per video at most (a served model's budget); None: any

    def views(self, source: Source, name: str | None = None, *, plans=None) -> tuple[np.ndarray, np.ndarray]:
        """`ClipSpec.cut_views` of this model's spec."""
        return self.spec.cut_views(source, name, plans=plans)

    @property
    def chunk_clips(self) -> int:
        """Clips cut and scored at a time: whole batches of views (lcm(batch_views, spatial_crops)), so that scoring
        chunk by chunk batches the views exactly as one `score` of all of them does, and gives the same figures."""
        return math.lcm(self.batch_views, self.spec.spatial_crops) // self.spec.spatial_crops

    def iter_scores(self, reader: VideoReader, plans: Sequence[ClipPlan]) -> Iterator[np.ndarray]:
        """Each chunk's view softmax (`score`) as `ClipSpec.iter_views` cuts it from the open video, `chunk_clips`
        clips at a time."""
        for fast in self.spec.iter_views(reader, plans, self.chunk_clips):
            yield self.score(fast, self.spec.slow_index)[0]

    @torch.no_grad()
    def score(
        self, fast: np.ndarray, slow_index: np.ndarray, *, features: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Each view's softmax (views, classes) float32, and with `features` its pooled features before the
        classifier (views, dim); the network's input is made by clip_inputs, as in training and evaluation."""
        fmt = memory_format(self.device.type)
        index = torch.as_tensor(slow_index, dtype=torch.long)
        probs, feats = [], []
        for i in range(0, len(fast), self.batch_views):
            chunk = torch.from_numpy(fast[i : i + self.batch_views]).to(self.device)
            inputs = clip_inputs({"fast": chunk, "slow_index": index.expand(len(chunk), -1)}, fmt)
            with autocast(self.device.type, self.mixed_precision):
                pooled = self.model.features(inputs)
                logits = self.model.head(pooled)
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            if features:
                feats.append(pooled.float().cpu())
        return torch.cat(probs).numpy(), (torch.cat(feats).numpy() if features else None)

    def probabilities(self, source: Source, name: str | None = None) -> np.ndarray:
        """Softmax over classes, averaged over the video's views (the reference test protocol)."""
        with self.spec.open(source, name, self.max_frames) as reader:
            plan = self.spec.plan(reader.info.frames_at(self.spec.target_fps))
            (probs,) = window_means(self.iter_scores(reader, plan.plans), [len(plan.test) * self.spec.spatial_crops])
        return probs

    def top(self, probs: np.ndarray, top_k: int) -> dict:
        """{"labels", "scores"}: the top_k classes of one probability vector, best first."""
        best = np.argsort(-probs, kind="stable")[:top_k]
        return {"labels": [self.class_names[j] for j in best], "scores": [round(float(probs[j]), 6) for j in best]}

    def predict(self, sources: Iterable[Source], top_k: int = 5, names: Sequence[str] | None = None) -> list[dict]:
        """Per video: {"video", "labels", "scores"} with the top_k classes, best first."""
        out = []
        for i, source in enumerate(sources):
            name = names[i] if names else describe(source, i)
            out.append({"video": name, **self.top(self.probabilities(source, name), top_k)})
        return out

    def timeline(
        self,
        source: Source,
        name: str | None = None,
        *,
        window_s: float | None = None,
        stride_s: float | None = None,
        top_k: int = 5,
        limits: TimelineLimits | None = None,
    ) -> dict:
        """Per-window top-k along one video and its segments (runs of windows with the same top label):
        {"video", "windows": [{"start_s", "end_s", "labels", "scores"}], "segments": [{"start_s", "end_s",
        "label", "score"}]}, and "clamped" (what was asked) where the window is longer than the video and so is
        all of it. A window's scores average its clips' views. A timeline over ``limits`` (default
        `TimelineLimits()`) is refused (`TimelineLimitError`) once the video's header is read, before any decoding;
        the views are cut and scored `chunk_clips` clips at a time, keeping only each window's probabilities."""
        crops = self.spec.spatial_crops
        with self.spec.open(source, name, self.max_frames) as reader:
            windows = self.spec.plan(
                reader.info.frames_at(self.spec.target_fps),
                test_views=False,
                windows=True,
                window_s=window_s,
                stride_s=stride_s,
                limits=limits,
            ).windows
            probs = window_means(
                self.iter_scores(reader, [p for w in windows for p in w.plans]), [len(w.plans) * crops for w in windows]
            )
        rows = [
            {"start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3), **self.top(p, top_k)}
            for w, p in zip(windows, probs, strict=True)
        ]
        out = {"video": name or describe(source, 0), "windows": rows, "segments": segments(rows)}
        if windows[0].clamped_from_s is not None:
            out["clamped"] = (
                f"window_s {windows[0].clamped_from_s:g} s is longer than the video "
                f"({windows[0].end_s:.3f} s): one window, the whole video"
            )
        return out


def window_means(chunks: Iterable[np.ndarray], views_per_window: Sequence[int]) -> np.ndarray:
    """Per window, the mean (float64) of its views' softmax, from view probabilities (views, classes) that arrive
    in chunks in window order, whatever their boundaries: only the window in progress is held."""
    out: list[np.ndarray] = []
    counts = iter(views_per_window)
    need = next(counts, None)
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        while need is not None and held >= need:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            out.append(block[:need].astype(np.float64).mean(0))
            pending, held = [block[need:]], held - need
            need = next(counts, None)
    return np.stack(out)


def segments(windows: Sequence[dict]) -> list[dict]:
    """Runs of consecutive windows with the same top label, merged. Where the label changes, the cut is halfway
    between the centres of the two windows on either side (where their clips are centred): windows that tile
    the video (stride = window) cut where the next one starts, and overlapping ones (stride < window) do not
    cut (window - stride) / 2 early, as cutting at the next window's start would. The first segment starts
    where the first window starts, the last ends where the last window ends; a segment's score is the mean
    top score over its windows."""
    out: list[dict] = []
    for before, w in zip([None, *windows], windows, strict=False):
        if out and out[-1]["label"] == w["labels"][0]:
            out[-1]["_scores"].append(w["scores"][0])
            continue
        start_s = w["start_s"]
        if out:
            start_s = out[-1]["end_s"] = round((before["start_s"] + before["end_s"] + w["start_s"] + w["end_s"]) / 4, 3)
        out.append({"start_s": start_s, "end_s": None, "label": w["labels"][0], "_scores": [w["scores"][0]]})
    if out:
        out[-1]["end_s"] = windows[-1]["end_s"]
    return [
        {
            "start_s": g["start_s"],
            "end_s": g["end_s"],
            "label": g["label"],
            "score": round(float(np.mean(g.pop("_scores"))), 6),
        }
        for g in out
    ]


def describe(source: Source, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<video {index}: {len(source)} bytes>" if hasattr(source, "__len__") else f"<video {index}>"
