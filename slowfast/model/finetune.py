"""Fine-tuning a loaded network: freeze the early stages, freeze batch norm.

Both act on the modules in place and must run before the optimizer is built (`build_optimizer` leaves
out parameters that need no gradient, so frozen ones get neither updates nor weight decay).
"""

from __future__ import annotations

from torch import nn

from .checkpoint import unwrap
from .config import STAGE_NAMES


class FrozenBatchNorm3d(nn.BatchNorm3d):
    """Batch norm with its statistics and affine fixed: it normalises with the running statistics even
    under `model.train()`, and its weight and bias need no gradient (PySlowFast's `freeze_fn` modes
    "bn_statistics" and "bn_parameters" together). The state dict keys are those of nn.BatchNorm3d.
    """

    def train(self, mode: bool = True) -> FrozenBatchNorm3d:
        return super().train(False)


def _freeze_bn(bn: nn.BatchNorm3d) -> FrozenBatchNorm3d:
    frozen = FrozenBatchNorm3d(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device=bn.running_mean.device,
        dtype=bn.running_mean.dtype,
    )
    # The same tensors, not copies: anything that holds them (an EMA, a parameter list) still sees them.
    frozen.weight, frozen.bias = bn.weight, bn.bias
    frozen.running_mean, frozen.running_var, frozen.num_batches_tracked = (
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
    )
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.train(False)


def freeze_batch_norm(module: nn.Module) -> int:
    """Replace every BatchNorm3d under `module` (the module itself excepted) by a FrozenBatchNorm3d.

    Returns how many were replaced. Fine-tuning with small batches keeps the checkpoint's statistics
    this way instead of re-estimating them from a few clips. Convert to SyncBatchNorm, if at all, before
    freezing: the conversion replaces every batch norm, frozen ones included.
    """
    targets = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.BatchNorm3d) and not isinstance(m, FrozenBatchNorm3d) and name
    ]
    for name, bn in targets:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, _freeze_bn(bn))
    return len(targets)


def freeze_stages(model: nn.Module, up_to: str) -> list[str]:
    """Freeze the stem and every stage up to `up_to` ("stem", "res2" ... "res5") in both pathways, with
    the lateral connections that leave those stages.

    A frozen stage computes a fixed function: its parameters need no gradient and its batch norms keep
    their statistics (FrozenBatchNorm3d). Returns the frozen parameter names, for the run log.
    """
    if up_to not in STAGE_NAMES:
        raise ValueError(f"freeze up_to must be one of {', '.join(STAGE_NAMES)}, got {up_to!r}")
    net = unwrap(model)
    stages = STAGE_NAMES[: STAGE_NAMES.index(up_to) + 1]
    prefixes = [
        f"{pathway}.{stage}" for pathway in ("slow", "fast") if getattr(net, pathway) is not None for stage in stages
    ] + [f"lateral.{stage}" for stage in stages if stage in net.lateral]
    frozen = []
    for prefix in prefixes:
        part = net.get_submodule(prefix)
        freeze_batch_norm(part)
        for name, p in part.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"{prefix}.{name}")
    return frozen
