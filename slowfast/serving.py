"""Classify video files with a trained SlowFast: decode, cut the test views, average the softmax, top-k.

`VideoClassifier` is what `python -m pipelines predict` and the MLflow pyfunc run. It needs torch, PyAV
and numpy only (no Ray, no shards), and cuts exactly the views evaluation reads from the eval shards:
frames resampled to the training frame rate, short side resized as preprocessing did, N uniformly
spaced clips, each scaled to the crop and cut into 1 or 3 spatial crops.

A registered model wraps it (the MLflow flavor lives in `pipelines.tracking`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slowfast.train import clip_inputs, memory_format
from slowfast.video import transforms
from slowfast.video.clips import ClipSampling, cut_clips
from slowfast.video.decode import DEFAULT_MAX_PIXELS, Source, VideoReader


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
        return ClipSampling(T=self.T, tau=self.tau, alpha=self.alpha, target_fps=self.target_fps,
                            short_side=self.short_side, mode="eval", num_clips=self.temporal_views)


class VideoClassifier:
    """A SlowFast network, its class names and its ClipSpec: video in, class probabilities out."""

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], spec: ClipSpec,
                 device: str | torch.device = "cpu", batch_views: int = 12):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_views = batch_views

    def views(self, source: Source, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One video's test views as the loader hands them over: uint8 fast frames (views, alpha*T, crop, crop, 3)
        and the slow pathway's frames as indices into them (T,)."""
        s = self.spec
        with VideoReader(source, name=name, max_pixels=DEFAULT_MAX_PIXELS, threads=1) as reader:
            clips = cut_clips(reader, s.sampling)
        fast = np.stack([np.ascontiguousarray(view) for i in range(len(clips))
                         for view in transforms.eval_views(clips.clip(i), s.crop, s.spatial_crops)])
        return fast, np.asarray(clips.slow_index)

    @torch.no_grad()
    def probabilities(self, source: Source, name: str | None = None) -> np.ndarray:
        """Softmax over classes, averaged over the video's views (the reference test protocol); the network's
        input is made by clip_inputs, as in training and evaluation."""
        fast, slow_index = self.views(source, name)
        fmt = memory_format(self.device.type)
        index = torch.as_tensor(slow_index, dtype=torch.long)
        total = torch.zeros(len(self.class_names), dtype=torch.float64)
        for i in range(0, len(fast), self.batch_views):
            chunk = torch.from_numpy(fast[i:i + self.batch_views]).to(self.device)
            batch = {"fast": chunk, "slow_index": index.expand(len(chunk), -1)}
            total += torch.softmax(self.model(clip_inputs(batch, fmt)).float(), dim=1).sum(0).double().cpu()
        return (total / len(fast)).numpy()

    def predict(self, sources: Iterable[Source], top_k: int = 5, names: Sequence[str] | None = None) -> list[dict]:
        """Per video: {"video", "labels", "scores"} with the top_k classes, best first."""
        out = []
        for i, source in enumerate(sources):
            name = names[i] if names else describe(source, i)
            probs = self.probabilities(source, name)
            best = np.argsort(-probs, kind="stable")[:top_k]
            out.append({"video": name, "labels": [self.class_names[j] for j in best],
                        "scores": [round(float(probs[j]), 6) for j in best]})
        return out


def describe(source: Source, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<video {index}: {len(source)} bytes>" if hasattr(source, "__len__") else f"<video {index}>"
