"""One training step of the reference recipe, shared by the Ray Train loop, the throughput benchmark's
in-memory baseline and the ablation study, so that all three time and train the same thing."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..video.transforms import normalize_tensor, resize_regions
from .optim import autocast, clip_gradients


class Step(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor  # a 0-d tensor: .item() waits for the device
    grad_norm: float | None  # before clipping; None when grad_clip is off


def clip_inputs(batch: dict, fmt: torch.memory_format) -> list[torch.Tensor]:
    """A loader batch, on the device, as the network's input [slow, fast]: normalised float32 (B, 3, T, H, W)
    tensors in memory format `fmt`. The one place where a batch becomes network input: training,
    validation, evaluation, the benchmarks and serving all go through it.

    batch["fast"]: uint8 (B, alpha*T, H, W, 3), the frames as ClipTransform emits them (permuted to
    (B, 3, alpha*T, H, W) they are channels_last_3d without a copy); batch["slow_index"]: (B, T), the slow
    pathway's frames as indices into them. The slow frames are gathered from the uint8 fast frames (4x
    fewer bytes than in float) with one index_select over the flattened (clip, frame) axis, which copies
    whole frames: on CPU 20x faster than the equivalent fast[rows, slow_index]. A train batch's
    batch["region"] (B, 4) says where each clip's crop box lies in its frames and how it is mirrored and
    resized (ClipTransform leaves that to the device): transforms.resize_regions, before the rest.
    """
    fast = batch["fast"]
    if "region" in batch:
        fast = resize_regions(fast, batch["region"])
    clips, frames = fast.shape[:2]
    first_frame = torch.arange(clips, device=fast.device).unsqueeze(1) * frames
    rows = (first_frame + batch["slow_index"].to(fast.device, torch.long)).flatten()
    slow = fast.flatten(0, 1).index_select(0, rows).unflatten(0, (clips, -1))
    return [normalize_tensor(x.permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)) for x in (slow, fast)]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    fmt: torch.memory_format,
    mixed_precision: bool = False,
    grad_clip: float | None = None,
    clipped: nn.Module | None = None,
) -> Step:
    """clip_inputs, forward (in bf16 where `autocast` gives it with mixed_precision), cross-entropy in fp32,
    backward, clip the global gradient norm to grad_clip, SGD step. batch: {"fast", "slow_index", "label"} on the
    model's device (see clip_inputs).
    clipped: the module whose gradients are clipped (the unwrapped network under DDP; default `model`)."""
    labels = batch["label"]
    inputs = clip_inputs(batch, fmt)
    with autocast(labels.device.type, mixed_precision):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(clipped if clipped is not None else model, grad_clip) if grad_clip else None
    optimizer.step()
    return Step(logits, loss, grad_norm)
