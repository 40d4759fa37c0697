"""The SlowFast network: two ResNet pathways over one clip, joined by lateral connections.

Read top to bottom: building blocks, the three lateral transforms, a pathway, the network.
Shapes are (B, C, T, H, W) throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import STAGE_NAMES, STAGE_OUT_MULT, SlowFastConfig


class ConvBN(nn.Module):
    """3D convolution, batch norm, and optionally ReLU; norm=False leaves the convolution bare (no BN, no ReLU)."""

    def __init__(self, dim_in, dim_out, kernel, stride=1, relu=True, norm=True):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        stride = (stride,) * 3 if isinstance(stride, int) else stride
        self.conv = nn.Conv3d(dim_in, dim_out, kernel, stride, padding=[k // 2 for k in kernel], bias=False)
        self.bn = nn.BatchNorm3d(dim_out) if norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if relu and norm else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Stem(nn.Module):
    """T x 7 x 7 convolution with spatial stride 2, then 1 x 3 x 3 max pooling with stride 2."""

    def __init__(self, dim_in, dim_out, temporal_kernel):
        super().__init__()
        self.conv = nn.Conv3d(
            dim_in, dim_out, (temporal_kernel, 7, 7), (1, 2, 2), padding=(temporal_kernel // 2, 3, 3), bias=False
        )
        self.bn = nn.BatchNorm3d(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class Bottleneck(nn.Module):
    """Residual block: a (T x 1 x 1), b (1 x 3 x 3, carries the spatial stride), c (1 x 1 x 1)."""

    def __init__(self, dim_in, dim_inner, dim_out, temporal_kernel, spatial_stride):
        super().__init__()
        self.a = ConvBN(dim_in, dim_inner, (temporal_kernel, 1, 1))
        self.b = ConvBN(dim_inner, dim_inner, (1, 3, 3), (1, spatial_stride, spatial_stride))
        self.c = ConvBN(dim_inner, dim_out, 1, relu=False)
        needs_projection = dim_in != dim_out or spatial_stride != 1
        self.shortcut = (
            ConvBN(dim_in, dim_out, 1, (1, spatial_stride, spatial_stride), relu=False) if needs_projection else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.c(self.b(self.a(x))) + identity)


class Pathway(nn.Module):
    """One ResNet pathway: stem and res2..res5. `lateral_in[i]` widens the input of stage i+1."""

    def __init__(self, in_channels, width, temporal_kernels, stage_blocks, lateral_in=(0, 0, 0, 0)):
        super().__init__()
        self.stem = Stem(in_channels, width, temporal_kernels[0])
        for i, name in enumerate(STAGE_NAMES[1:]):
            dim_in = width * STAGE_OUT_MULT[i] + lateral_in[i]
            dim_out = width * STAGE_OUT_MULT[i + 1]
            dim_inner = dim_out // 4
            stride = 1 if name == "res2" else 2
            blocks = [
                Bottleneck(
                    dim_in if j == 0 else dim_out, dim_inner, dim_out, temporal_kernels[i + 1], stride if j == 0 else 1
                )
                for j in range(stage_blocks[i])
            ]
            self.add_module(name, nn.Sequential(*blocks))

    def stage(self, name: str) -> nn.Module:
        return getattr(self, name)


class TimeToChannel(nn.Module):
    """{alpha*T, S^2, beta*C} -> {T, S^2, alpha*beta*C}: each run of alpha fast frames becomes channels."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // self.alpha, self.alpha, h, w).transpose(2, 3)
        return x.reshape(b, c * self.alpha, t // self.alpha, h, w)


class TimeStridedSampling(nn.Module):
    """Keep one fast frame of every alpha."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return x[:, :, :: self.alpha]


def time_strided_conv(dim_in, dim_out, kernel, alpha, norm=True) -> ConvBN:
    """kernel x 1 x 1 convolution with temporal stride alpha (the paper's best lateral), then BN and ReLU;
    norm=False is mmaction2's lateral_norm=False: the convolution alone, no bias."""
    return ConvBN(dim_in, dim_out, (kernel, 1, 1), (alpha, 1, 1), norm=norm)


class FastInput(nn.Module):
    """The paper's weaker-spatial-input ablation: the fast pathway sees rgb, grayscale or time differences."""

    # ITU-R BT.601 luma weights; linear, so they apply to normalised inputs too.
    LUMA = (0.299, 0.587, 0.114)

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.register_buffer("luma", torch.tensor(self.LUMA).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, x):
        if self.mode == "grayscale":
            return (x * self.luma).sum(1, keepdim=True)
        if self.mode == "time_difference":
            # Frame t minus frame t-1; the first frame has no predecessor and gets zeros.
            return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        return x

    def extra_repr(self):
        return self.mode


class SlowFast(nn.Module):
    """SlowFast (or one of its pathways alone). forward([slow, fast]) -> logits (B, num_classes)."""

    def __init__(self, cfg: SlowFastConfig):
        super().__init__()
        self.cfg = cfg
        blocks = cfg.stage_blocks
        use_slow, use_fast = cfg.arch in ("slowfast", "slow"), cfg.arch in ("slowfast", "fast")
        lateral_in = tuple(cfg.lateral_channels(STAGE_OUT_MULT[i]) for i in range(4))
        if cfg.fusion == "sum" or cfg.arch != "slowfast":
            lateral_in = (0, 0, 0, 0)
        self.fast_input = FastInput(cfg.fast_input) if use_fast else None
        self.slow = Pathway(3, cfg.width, cfg.slow_temporal_kernels, blocks, lateral_in) if use_slow else None
        self.fast = (
            Pathway(cfg.fast_in_channels, cfg.fast_width, cfg.fast_temporal_kernels, blocks) if use_fast else None
        )
        self.lateral = nn.ModuleDict()
        if cfg.arch == "slowfast" and cfg.lateral != "none":
            for i, name in enumerate(STAGE_NAMES[:4]):
                self.lateral[name] = self._lateral(cfg, STAGE_OUT_MULT[i])
        head_in = (cfg.width * STAGE_OUT_MULT[4] if use_slow else 0) + (
            cfg.fast_width * STAGE_OUT_MULT[4] if use_fast else 0
        )
        self.head = nn.Sequential()
        self.head.add_module("dropout", nn.Dropout(cfg.dropout))
        self.head.add_module("fc", nn.Linear(head_in, cfg.num_classes))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self._init_weights()

    @staticmethod
    def _lateral(cfg: SlowFastConfig, mult: int) -> nn.Module:
        if cfg.lateral == "time_to_channel":
            return TimeToChannel(cfg.alpha)
        if cfg.lateral == "time_strided_sampling":
            return TimeStridedSampling(cfg.alpha)
        return time_strided_conv(
            cfg.fast_width * mult, cfg.lateral_channels(mult), cfg.fusion_kernel, cfg.alpha, norm=cfg.lateral_norm
        )

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.c.bn.weight)

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate [slow, fast] (or the one pathway a single-pathway model uses); return both."""
        cfg = self.cfg
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
            raise ValueError(f"expected a list [slow, fast] of (B, C, T, H, W) tensors, got {type(inputs).__name__}")
        if len(inputs) == 1 and cfg.arch != "slowfast":
            inputs = [inputs[0], None] if cfg.arch == "slow" else [None, inputs[0]]
        if len(inputs) != 2:
            raise ValueError(f"expected 2 pathways [slow, fast], got {len(inputs)} tensors")
        slow, fast = inputs
        slow = slow if self.slow is not None else None
        fast = fast if self.fast is not None else None
        for name, x in (("slow", slow), ("fast", fast)):
            if x is None:
                continue
            if x.dim() != 5:
                raise ValueError(f"{name} pathway: expected 5 dims (B, C, T, H, W), got shape {tuple(x.shape)}")
            if x.shape[1] != 3:
                raise ValueError(
                    f"{name} pathway: expected 3 channels (RGB), got {x.shape[1]} in shape {tuple(x.shape)}"
                )
        if slow is not None and fast is not None:
            if fast.shape[2] != cfg.alpha * slow.shape[2]:
                raise ValueError(
                    f"fast frames must be alpha x slow frames: expected {cfg.alpha} x "
                    f"{slow.shape[2]} = {cfg.alpha * slow.shape[2]}, got {fast.shape[2]}"
                )
            if fast.shape[0] != slow.shape[0]:
                raise ValueError(f"slow and fast batch sizes differ: {slow.shape[0]} vs {fast.shape[0]}")
        if fast is not None and self.lateral and cfg.lateral != "time_strided_conv" and fast.shape[2] % cfg.alpha:
            raise ValueError(
                f"lateral={cfg.lateral} needs fast frames divisible by alpha={cfg.alpha}, got {fast.shape[2]}"
            )
        return slow, fast

    def features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled, concatenated pathway features before dropout and the classifier."""
        slow, fast = self.check_inputs(inputs)
        if fast is not None:
            fast = self.fast_input(fast)
        for name in STAGE_NAMES:
            if slow is not None:
                slow = self.slow.stage(name)(slow)
            if fast is not None:
                fast = self.fast.stage(name)(fast)
            if name in self.lateral:
                side = self.lateral[name](fast)
                slow = slow + side if self.cfg.fusion == "sum" else torch.cat([slow, side], dim=1)
        pooled = [self.pool(x).flatten(1) for x in (slow, fast) if x is not None]
        return torch.cat(pooled, dim=1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(inputs))


def example_inputs(cfg: SlowFastConfig, batch: int = 1, size: int = 224) -> list[torch.Tensor]:
    """Random [slow, fast] clips with the shapes the config expects."""
    return [torch.randn(batch, 3, cfg.slow_frames, size, size), torch.randn(batch, 3, cfg.fast_frames, size, size)]
