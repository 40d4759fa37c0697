"""SlowFast models: `build` a preset, `load_checkpoint` from this project, pytorchvideo or PySlowFast."""
from __future__ import annotations

from torch import nn

from .checkpoint import CheckpointError, LoadedCheckpoint, export_state_dict, load_checkpoint, save_checkpoint
from .config import PRESETS, SlowFastConfig, resolve
from .flops import count_flops, count_params, gflops
from .slowfast import SlowFast, example_inputs

__all__ = ["PRESETS", "SlowFast", "SlowFastConfig", "CheckpointError", "LoadedCheckpoint", "build", "count_flops",
           "count_params", "example_inputs", "export_state_dict", "gflops", "load_checkpoint", "resolve", "save_checkpoint"]


def build(preset: str, num_classes: int = 400, **overrides) -> nn.Module:
    """A freshly initialised network from a named preset; any config field can be overridden."""
    return SlowFast(resolve(preset, num_classes=num_classes, **overrides))
