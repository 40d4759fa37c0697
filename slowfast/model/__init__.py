"""SlowFast models: `build` a preset, `load_checkpoint` from this project, pytorchvideo, PySlowFast (.pyth,
Caffe2 .pkl) or mmaction2, and fine-tune it (`freeze_stages`, `freeze_batch_norm`).

The torch-backed names load on first use, so code that only needs the presets (configs, Ray Data
actors that decode video) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

from .config import PRESETS, SlowFastConfig, resolve

_LAZY = {
    "CheckpointError": "checkpoint",
    "LoadedCheckpoint": "checkpoint",
    "check_checkpoint": "checkpoint",
    "export_checkpoint": "checkpoint",
    "export_state_dict": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "FrozenBatchNorm3d": "finetune",
    "freeze_batch_norm": "finetune",
    "freeze_stages": "finetune",
    "count_flops": "flops",
    "count_params": "flops",
    "gflops": "flops",
    "SlowFast": "slowfast",
    "example_inputs": "slowfast",
}

__all__ = ["PRESETS", "SlowFastConfig", "build", "resolve", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(preset: str, num_classes: int = 400, **overrides):
    """A freshly initialised network (torch.nn.Module) from a named preset; any field can be overridden."""
    from .slowfast import SlowFast

    return SlowFast(resolve(preset, num_classes=num_classes, **overrides))
