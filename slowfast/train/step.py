"""One training step of the reference recipe, shared by the Ray Train loop, the throughput benchmark's
in-memory baseline and the ablation study, so that all three time and train the same thing."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..video.transforms import normalize_tensor
from .optim import autocast, clip_gradients


class Step(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor  # a 0-d tensor: .item() waits for the device
    grad_norm: float | None  # before clipping; None when grad_clip is off


def clip_inputs(batch: dict, fmt: torch.memory_format) -> list[torch.Tensor]:
    """A batch's uint8 "slow" and "fast" clips as the network's input: normalised float32 in layout `fmt`."""
    return [normalize_tensor(batch[k]).contiguous(memory_format=fmt) for k in ("slow", "fast")]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, *, fmt: torch.memory_format,
               mixed_precision: bool = False, grad_clip: float | None = None,
               clipped: nn.Module | None = None) -> Step:
    """Normalise, forward (bf16 autocast on CUDA with mixed_precision), cross-entropy in fp32, backward, clip
    the global gradient norm to grad_clip, SGD step. batch: {"slow", "fast", "label"} on the model's device.
    clipped: the module whose gradients are clipped (the unwrapped network under DDP; default `model`)."""
    labels = batch["label"]
    with autocast(labels.device.type, mixed_precision):
        logits = model(clip_inputs(batch, fmt))
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(clipped if clipped is not None else model, grad_clip) if grad_clip else None
    optimizer.step()
    return Step(logits, loss, grad_norm)
