"""Parameter and FLOP counts (one multiply-add = one FLOP, the paper's convention).

FLOPs are counted the way the reference counter counts an eval-mode model (fvcore's
FlopCountAnalysis, behind PySlowFast's `misc.get_flop_stats`): convolutions, linear layers and
batch norm. That reproduces DESIGN.md's 36.3 / 66.1 / 126.4 GFLOPs to the last digit.
"""

from __future__ import annotations

import math
from itertools import chain

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from .config import SlowFastConfig, resolve
from .slowfast import SlowFast, example_inputs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch_norm_flops(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    # Eval-mode batch norm is two multiply-adds per element, (x - mean) * rsqrt(var + eps) and
    # gamma * x + beta (one without affine), as fvcore's batchnorm_flop_jit counts it. Counted
    # here in FlopCounterMode's unit, 2 FLOPs per multiply-add, like its conv and matmul formulas.
    return 2 * math.prod(input_shape) * (2 if weight_shape is not None else 1)


_aten = torch.ops.aten
# Every kernel an eval-mode batch norm can dispatch to (CPU and meta, CUDA, ROCm, decompositions).
_BATCH_NORM_OPS = {
    op: _batch_norm_flops
    for op in (
        _aten.native_batch_norm,
        _aten._native_batch_norm_legit_no_training,
        _aten._native_batch_norm_legit,
        _aten.cudnn_batch_norm,
        _aten.miopen_batch_norm,
    )
}


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    return x


@torch.no_grad()
def count_flops(model: nn.Module, inputs, *, batch_norm: bool = True, meta: bool = True) -> int:
    """Multiply-adds of one eval-mode `model(inputs)`: convolutions, linear layers and batch norm.

    What is left out follows fvcore too: ReLU, pooling and residual additions (memory-bound; at one
    FLOP per element they would add about 0.5%). `batch_norm=False` counts convolutions and linear
    layers alone, as pytorchvideo's model zoo did for slowfast_r50 and slow_r50 (65.71 and 54.52)
    and as fits a deployed network whose batch norm is folded into the convolutions:
    36.10 / 65.71 / 125.91 GFLOPs for the reference presets instead of 36.34 / 66.07 / 126.42.

    With `meta=True` the model runs on shape-only meta tensors (the weights are swapped in by
    `functional_call`, the model itself is untouched): the count is exact and takes under a second
    whatever the model's size or device. `meta=False` runs it for real, for models whose forward
    needs real values.
    """
    mapping = _BATCH_NORM_OPS if batch_norm else {}
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            if meta:
                tensors = {
                    name: torch.empty_like(t, device="meta")
                    for name, t in chain(
                        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
                    )
                }
                functional_call(model, tensors, (_to_meta(inputs),))
            else:
                model(inputs)
    finally:
        model.train(was_training)
    # FlopCounterMode counts a multiply-add as 2 FLOPs; every formula above is in that unit.
    return counter.get_total_flops() // 2


def gflops(cfg_or_model: SlowFastConfig | str | nn.Module, size: int = 256, *, batch_norm: bool = True) -> float:
    """GFLOPs of one size x size clip (batch 1) through a SlowFast model, a config or a preset name."""
    if isinstance(cfg_or_model, nn.Module):
        model, cfg = cfg_or_model, cfg_or_model.cfg
    else:
        cfg = resolve(cfg_or_model) if isinstance(cfg_or_model, str) else cfg_or_model
        with torch.device("meta"):
            model = SlowFast(cfg)
    with torch.device("meta"):
        inputs = example_inputs(cfg, batch=1, size=size)
    return count_flops(model, inputs, batch_norm=batch_norm) / 1e9
