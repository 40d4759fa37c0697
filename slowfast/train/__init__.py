"""The math of training: optimizer and its step, LR schedule, video-level metrics and their plots.

Pure PyTorch (and matplotlib for the plots); the loop, Ray Train and MLflow live in `pipelines`.
"""

from .metrics import MetricsError, VideoAggregator, confusion_matrix_png, learning_curve_png, topk_correct
from .optim import REFERENCE_BATCH, autocast, build_optimizer, clip_gradients, memory_format, param_groups, scaled_lr
from .schedule import LRSchedule, cosine_lr, lr_at
from .step import Step, clip_inputs, train_step

__all__ = [
    "REFERENCE_BATCH",
    "LRSchedule",
    "MetricsError",
    "Step",
    "VideoAggregator",
    "autocast",
    "build_optimizer",
    "clip_gradients",
    "clip_inputs",
    "confusion_matrix_png",
    "cosine_lr",
    "learning_curve_png",
    "lr_at",
    "memory_format",
    "param_groups",
    "scaled_lr",
    "topk_correct",
    "train_step",
]
