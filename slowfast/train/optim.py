"""One optimizer step: SGD with Nesterov momentum, weight decay on weights only, clipping, precision
(bf16 autocast on CUDA and on CPUs with bf16 in hardware) and memory format.

The recipe is the paper's (PySlowFast `SOLVER`): momentum 0.9, Nesterov, weight decay 1e-4, no decay
on batch-norm parameters (`BN.WEIGHT_DECAY: 0.0`) and, here, none on any bias or 1-D parameter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

# base_lr is quoted for this many clips per optimizer step (the paper: 8 GPUs x 8 clips, lr 0.1).
REFERENCE_BATCH = 64

# _NormBase: every BatchNorm (SyncBatchNorm included) and InstanceNorm; their weights are 1-D anyway,
# but naming them keeps the rule right for any norm whose affine parameters are not.
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """The linear scaling rule: base_lr is for `reference_batch` clips; lr grows with the global batch."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1, got global_batch={global_batch}, reference_batch={reference_batch}"
        )
    return base_lr * global_batch / reference_batch


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> list[dict]:
    """Two groups: weights that decay, and everything that must not (norm parameters, biases, 1-D).

    With head_lr_mult != 1 the classifier (the module named "head", SlowFast's) gets two groups of its
    own, carrying `lr_mult`: its learning rate is the backbone's times head_lr_mult (fine-tuning a new
    head faster than a pretrained backbone); a schedule sets each group's lr to its LR times lr_mult.
    Frozen parameters are left out: no update, no weight decay;
    a parameter shared by two modules is listed once. Each group carries `param_names` for logs and
    tests (SGD ignores unknown keys).
    """
    if head_lr_mult <= 0:
        raise ValueError(f"head_lr_mult must be > 0, got {head_lr_mult}")
    head = set()
    if head_lr_mult != 1.0:
        heads = [m for name, m in model.named_modules() if name.rpartition(".")[2] == "head"]
        if not heads:
            raise ValueError(
                f"head_lr_mult={head_lr_mult} needs a classifier module named 'head'; {type(model).__name__} has none"
            )
        head = {id(p) for m in heads for p in m.parameters()}
    groups: dict[tuple[bool, bool], dict] = {}  # (in the head, decays) -> {name: parameter}
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            decays = not (isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1)
            groups.setdefault((id(p) in head, decays), {})[full] = p
    result = []
    for in_head in (False, True):
        for decays in (True, False):
            params = groups.get((in_head, decays))
            if params:
                group = {
                    "params": list(params.values()),
                    "param_names": list(params),
                    "weight_decay": weight_decay if decays else 0.0,
                }
                result.append(group | {"lr_mult": head_lr_mult} if in_head else group)
    return result


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = True,
    head_lr_mult: float = 1.0,
) -> torch.optim.SGD:
    """SGD over `param_groups(model, weight_decay, head_lr_mult)`. `lr` is the starting value (times a
    group's `lr_mult`); the schedule sets it per step."""
    groups = param_groups(model, weight_decay, head_lr_mult)
    for group in groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    # The reference uses no dampening; torch refuses Nesterov with dampening anyway.
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def clip_gradients(parameters: Iterable[torch.Tensor] | nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None = leave as is); return the norm before clipping.

    The norm is returned either way so that it can be logged; a non-finite norm means a diverged step.
    """
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return float(norm)


class Bf16Support(NamedTuple):
    """Whether this CPU does bf16 arithmetic in hardware; `reason`: the flags found, or what is missing."""

    supported: bool
    reason: str


# avx512_bf16: Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later; amx_bf16: Sapphire Rapids and
# later; bf16 (aarch64 "Features"): the Armv8.6 BF16 extension (Graviton3, Neoverse V1/N2). Without one of them
# oneDNN emulates bf16 or leaves conv3d to slow reference kernels: on an AMD EPYC Zen 3 (AVX2 only) bf16 autocast
# made a slowfast_tiny train step 12.9x slower than fp32 (56 px, batch 16, 2 threads, channels_last_3d).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> Bf16Support:
    """Whether `autocast` uses bf16 on this CPU: oneDNN in this PyTorch build and one of BF16_CPU_FLAGS among
    the CPU flags that Linux lists in `cpuinfo`. Elsewhere (no /proc, as on macOS and Windows) the answer is no.
    Read once per process and path."""
    if not torch.backends.mkldnn.is_available():
        return Bf16Support(False, "this PyTorch build has no oneDNN (torch.backends.mkldnn), which runs CPU bf16")
    try:
        text = Path(cpuinfo).read_text()
    except OSError as err:
        return Bf16Support(False, f"cannot read the CPU flags from {cpuinfo}: {err.strerror}")
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            flags.update(value.split())
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found:
        return Bf16Support(True, ", ".join(found))
    return Bf16Support(False, f"no {', '.join(BF16_CPU_FLAGS)} flag in {cpuinfo}")


def autocast(device_type: str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, and on a CPU with bf16 in hardware (`cpu_bf16`); a no-op elsewhere, or when disabled.

    Weights, gradients and optimizer state stay fp32; the caller computes the loss in fp32 (`train_step` casts
    the logits). No loss scaling: bf16 has fp32's exponent range. `describe_precision` says which one applies.
    """
    if enabled and (device_type == "cuda" or (device_type == "cpu" and cpu_bf16().supported)):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_precision(device_type: str, enabled: bool) -> str:
    """What `autocast(device_type, enabled)` runs, for logs and the CLI: "bf16 on CPU: supported (avx512_bf16)"."""
    if not enabled:
        return "fp32 (mixed precision off)"
    if device_type == "cuda":
        return "bf16 autocast on CUDA"
    if device_type == "cpu":
        support = cpu_bf16()
        if support.supported:
            return f"bf16 on CPU: supported ({support.reason})"
        return f"bf16 on CPU: not supported ({support.reason}): fp32"
    return f"fp32 (no bf16 autocast on {device_type})"


def memory_format(device_type: str) -> torch.memory_format:
    """channels_last_3d on CUDA (cuDNN's fast NDHWC conv3d kernels, tensor cores in bf16) and on CPU (oneDNN's
    NDHWC kernels: a train step took 0.80x the time of contiguous for slowfast_8x8_r50 at 224, 0.88x at 112, 0.82x
    for slowfast_tiny at 64, 0.76-0.95x for every ablation variant at 48, on a 2-core AMD EPYC); contiguous on
    other devices, where it was not measured.

    Apply the same format to the model (`model.to(memory_format=...)`) and to its inputs
    (`x.contiguous(memory_format=...)`), or PyTorch converts back and forth at every layer.
    """
    return torch.channels_last_3d if device_type in ("cuda", "cpu") else torch.contiguous_format
