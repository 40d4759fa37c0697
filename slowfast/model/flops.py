"""Parameter and FLOP counts (one multiply-add = one FLOP, the paper's convention)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model, inputs) -> int:
    raise NotImplementedError
