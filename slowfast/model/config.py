"""SlowFast architecture as data: one validated config per network, and the named presets.

Field names follow the paper (Feichtenhofer et al., ICCV 2019): T, tau, alpha, beta, lateral.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Arch = Literal["slowfast", "slow", "fast"]
Lateral = Literal["time_strided_conv", "time_to_channel", "time_strided_sampling", "none"]
Fusion = Literal["concat", "sum"]
FastInput = Literal["rgb", "grayscale", "time_difference"]

# Bottleneck blocks per stage (res2..res5); depth = 3 * sum(blocks) + 2, as for ResNet.
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# Channels of each stage's output relative to the stem width C (stem, res2, res3, res4, res5).
STAGE_OUT_MULT = (1, 4, 8, 16, 32)
STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")


class SlowFastConfig(BaseModel):
    """Everything that shapes the network. Presets below fill it; any field can be overridden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch = Field("slowfast", description="slowfast, or one pathway alone: slow (Slow-only) or fast (Fast-only)")
    depth: Literal[14, 26, 50, 101, 152] = Field(50, description="ResNet depth of the bottleneck stages")
    width: int = Field(64, ge=1, description="C: slow pathway channels after the stem")
    T: int = Field(8, ge=1, description="slow pathway frames")
    tau: int = Field(8, ge=1, description="slow pathway temporal stride, in source frames")
    alpha: int = Field(4, ge=1, description="frame-rate ratio fast/slow")
    beta: float = Field(1 / 8, gt=0, le=1, description="channel ratio fast/slow")
    lateral: Lateral = Field("time_strided_conv", description="how fast features are matched to slow time")
    fusion: Fusion = Field("concat", description="how lateral features join the slow pathway")
    fusion_kernel: int = Field(7, ge=1, description="temporal kernel of the time-strided conv lateral")
    fusion_channel_ratio: int = Field(2, ge=1, description="time-strided conv outputs ratio * beta * C channels")
    lateral_norm: bool = Field(
        True,
        description="time-strided conv lateral only: batch norm and ReLU after the conv (the paper, PySlowFast, "
        "pytorchvideo); false = the bare conv of mmaction2's lateral_norm=False checkpoints",
    )
    fast_input: FastInput = Field("rgb", description="fast pathway input: rgb, grayscale or time_difference")
    slow_temporal_kernels: tuple[int, int, int, int, int] = Field(
        (1, 1, 1, 3, 3), description="temporal kernel of the stem and of conv_a in res2..res5, slow pathway"
    )
    fast_temporal_kernels: tuple[int, int, int, int, int] = Field(
        (5, 3, 3, 3, 3), description="temporal kernel of the stem and of conv_a in res2..res5, fast pathway"
    )
    dropout: float = Field(0.5, ge=0, lt=1)
    num_classes: int = Field(400, ge=1)
    zero_init_last_bn: bool = Field(True, description="zero gamma of the last BN of every residual block")

    @field_validator("beta", mode="before")
    @classmethod
    def _beta_fraction(cls, value):
        # Accept "1/8" as well as 0.125: the paper writes beta as a fraction.
        if isinstance(value, str) and "/" in value:
            return float(Fraction(value))
        return value

    @field_validator("fusion_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"fusion_kernel must be odd so the lateral stays centred in time, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SlowFastConfig:
        fast = self.width * self.beta
        if self.arch != "slow" and abs(fast - round(fast)) > 1e-6:
            raise ValueError(
                f"width * beta must be a whole number of fast channels, got {self.width} * {self.beta:g} = {fast:g}"
            )
        if not self.lateral_norm and self.lateral != "time_strided_conv":
            raise ValueError(
                f"lateral_norm=False describes the time-strided conv lateral; lateral='{self.lateral}' "
                "has no conv to leave bare. Drop lateral_norm or use lateral='time_strided_conv'"
            )
        if self.arch == "slowfast" and self.fusion == "sum" and self.lateral == "none":
            raise ValueError("fusion='sum' needs a lateral connection; lateral='none' only makes sense with concat")
        if self.arch == "slowfast" and self.fusion == "sum" and self.lateral != "time_strided_conv":
            if self.lateral_channels(1) != STAGE_OUT_MULT[0] * self.width:
                raise ValueError(
                    f"fusion='sum' with lateral='{self.lateral}' needs lateral channels equal to slow channels "
                    f"({self.lateral_channels(1)} vs {self.width} at the stem with alpha={self.alpha}, "
                    f"beta={self.beta:g}); time_to_channel sums only when alpha * beta == 1. "
                    "Use fusion='concat' or lateral='time_strided_conv'"
                )
        return self

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return STAGE_BLOCKS[self.depth]

    @property
    def fast_width(self) -> int:
        return round(self.width * self.beta)

    @property
    def slow_frames(self) -> int:
        return self.T

    @property
    def fast_frames(self) -> int:
        return self.alpha * self.T

    @property
    def fast_in_channels(self) -> int:
        return 1 if self.fast_input == "grayscale" else 3

    def lateral_channels(self, mult: int) -> int:
        """Channels the lateral adds to the slow pathway where the fast pathway has mult * beta * C."""
        fast = self.fast_width * mult
        if self.lateral == "none":
            return 0
        if self.lateral == "time_to_channel":
            return self.alpha * fast
        if self.lateral == "time_strided_sampling":
            return fast
        if self.fusion == "sum":
            return self.width * mult
        return self.fusion_channel_ratio * fast


def _preset(**fields) -> SlowFastConfig:
    return SlowFastConfig(**fields)


# The paper's networks (reference parameter counts at 400 classes are in tests/test_model.py),
# then small networks that train in minutes on a CPU for the demo, the tests and the ablations.
PRESETS: dict[str, SlowFastConfig] = {
    "slowfast_4x16_r50": _preset(T=4, tau=16, alpha=8, fusion_kernel=5),
    "slowfast_8x8_r50": _preset(T=8, tau=8, alpha=4, fusion_kernel=7),
    "slowfast_8x8_r101": _preset(depth=101, T=8, tau=8, alpha=4, fusion_kernel=5),
    "slow_8x8_r50": _preset(arch="slow", T=8, tau=8),
    "slowfast_tiny": _preset(depth=14, width=32, T=4, tau=8, alpha=4, fusion_kernel=5, dropout=0.3),
    "slow_tiny": _preset(arch="slow", depth=14, width=32, T=4, tau=8, dropout=0.3),
    "fast_tiny": _preset(arch="fast", depth=14, width=32, T=4, tau=8, alpha=4, dropout=0.3),
    "slowfast_small": _preset(depth=26, width=32, T=8, tau=8, alpha=4, fusion_kernel=5),
}


def resolve(preset: str, **overrides) -> SlowFastConfig:
    """The preset's config with `overrides` applied; unknown preset names list the known ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return SlowFastConfig(**{**PRESETS[preset].model_dump(), **overrides})
