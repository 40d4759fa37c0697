"""The one evaluation loop: a stream of view batches -> video-level scores (and clip-level loss/accuracy).

The training run's validation, `pipelines evaluate`, the ablation study and batch inference all score
through `score_views`, so a view is identified, weighed and averaged the same way everywhere. Which
views are read is `slowfast.video.sampling.choose_views`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..video.transforms import SPATIAL_POSITIONS
from .metrics import VideoAggregator, topk_correct
from .optim import autocast
from .step import clip_inputs


def view_ids(clip_index: torch.Tensor, spatial_index: torch.Tensor) -> list[int]:
    """A view's id within its video: temporal view x the spatial positions (a centre-only view and the
    centre of three get the same id, so their scores are the same view's)."""
    return (clip_index.long() * SPATIAL_POSITIONS + spatial_index.long().clamp(min=0)).tolist()


@dataclass
class EvalTotals:
    """What scoring a stream adds up: per-video softmax sums, and clip-level loss and top-1 counts."""

    videos: VideoAggregator = field(default_factory=VideoAggregator)
    loss_sum: float = 0.0
    clips_correct: int = 0
    clips: int = 0

    @property
    def clip_loss(self) -> float:
        return self.loss_sum / max(self.clips, 1)

    @property
    def clip_top1(self) -> float:
        return self.clips_correct / max(self.clips, 1)

    def state_dict(self) -> dict:
        return {
            "videos": self.videos.state_dict(),
            "loss_sum": self.loss_sum,
            "clips_correct": self.clips_correct,
            "clips": self.clips,
        }

    @classmethod
    def merged(cls, states: Iterable[dict]) -> EvalTotals:
        """One total from the partial states of several workers."""
        states = list(states)
        return cls(
            VideoAggregator.from_state_dicts(s["videos"] for s in states),
            sum(s["loss_sum"] for s in states),
            sum(s["clips_correct"] for s in states),
            sum(s["clips"] for s in states),
        )


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch with its tensors on `device` (ids and other lists stay where they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def score_views(
    net: nn.Module,
    batches: Iterable[dict],
    *,
    device: torch.device | str,
    fmt: torch.memory_format = torch.contiguous_format,
    mixed_precision: bool = False,
    totals: EvalTotals | None = None,
) -> EvalTotals:
    """Score every view of `batches` (iter_clips / Ray Data eval batches: clips plus "label", "video_id",
    "clip_index", "spatial_index") with `net` in eval mode; returns (or adds to) the totals. The caller
    chooses the views (iter_clips(views=...)) and restores train mode if it needs it."""
    device = torch.device(device)
    totals = totals if totals is not None else EvalTotals()
    net.eval()
    for batch in batches:
        batch = to_device(batch, device)
        labels = batch["label"].long()
        with autocast(device.type, mixed_precision):
            logits = net(clip_inputs(batch, fmt)).float()
        totals.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        totals.clips_correct += topk_correct(logits, labels, (1,))[1]
        totals.clips += len(labels)
        totals.videos.add(
            list(batch["video_id"]),
            labels.cpu(),
            logits.cpu(),
            view_ids=view_ids(batch["clip_index"].cpu(), batch["spatial_index"].cpu()),
        )
    return totals
