"""The reference implementation for the checkpoint tests: pytorchvideo's SlowFast networks with random
weights and batch-norm statistics, and the comparisons the import tests make against them."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
import warnings

import pytest
import torch
from torch import nn

TOLERANCE = 1e-4


@functools.cache
def pytorchvideo() -> types.SimpleNamespace:
    """pytorchvideo's model builders (hub, create_slowfast), importable without torchvision.

    pytorchvideo 0.1.5 imports torchvision only for RoIAlign (models/head.py, detection heads),
    which SlowFast classification never builds. torchvision is not part of this project's
    environment, so a stand-in module answers that one import when the real one is absent.
    """
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchvision") is None:
            torchvision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

            class RoIAlign(nn.Module):
                def __init__(self, *args, **kwargs):
                    raise RuntimeError("torchvision stand-in: RoIAlign is not available in these tests")

            ops.RoIAlign, torchvision.ops = RoIAlign, ops
            mp.setitem(sys.modules, "torchvision", torchvision)
            mp.setitem(sys.modules, "torchvision.ops", ops)
        with warnings.catch_warnings():
            # fvcore, imported by pytorchvideo, calls torch.jit.script at import time.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            hub = importlib.import_module("pytorchvideo.models.hub")
            slowfast = importlib.import_module("pytorchvideo.models.slowfast")
    return types.SimpleNamespace(hub=hub, create_slowfast=slowfast.create_slowfast)


def randomize(model: nn.Module, frames: tuple[int, ...], seed: int, size: int = 112) -> nn.Module:
    """Random weights and random batch-norm statistics (zero-initialised gammas included).

    Purely random running statistics would let activations grow geometrically through 100 layers,
    and float32 round-off with them; so each BN's statistics are drawn around what it actually sees
    (mean + noise, variance x U(0.5, 2)), in one eval-mode pass of the backbone on `size` px clips.
    """
    g = torch.Generator().manual_seed(seed)

    def draw_stats(bn, args):
        x = args[0]
        mean, var = x.mean((0, 2, 3, 4)), x.var((0, 2, 3, 4))
        bn.running_mean.copy_(mean + 0.2 * var.sqrt() * torch.randn(mean.numel(), generator=g))
        bn.running_var.copy_(var * torch.empty(var.numel()).uniform_(0.5, 2.0, generator=g))

    hooks = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                hooks.append(m.register_forward_pre_hook(draw_stats))
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        model.eval()
        x = [torch.randn(1, 3, t, size, size, generator=g) for t in frames]
        x = x if len(x) > 1 else x[0]
        for block in model.blocks[:5]:  # stem and res2..res5; the head's pool has a fixed size
            x = block(x)
    for hook in hooks:
        hook.remove()
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(list(inputs))  # a copy: pytorchvideo's forward overwrites the list's entries


def assert_same_state(model, reference):
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key


def assert_same_logits(expected, got):
    assert got.shape == expected.shape
    # The logits spread over several units, so a wrong mapping could not hide under the tolerance.
    assert expected.std() > 0.5
    assert (got - expected).abs().max().item() < TOLERANCE
