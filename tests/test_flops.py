"""FLOP counts: the paper's reference presets at 256x256, and how FLOPs scale with the architecture."""

from functools import cache

import pytest
import torch

from slowfast.model import build, count_flops, example_inputs
from slowfast.model.flops import gflops

# DESIGN.md: GFLOPs at a 256x256 input, one multiply-add = one FLOP (fvcore's count).
REFERENCE_GFLOPS = {
    "slowfast_4x16_r50": 36.3,
    "slowfast_8x8_r50": 66.1,
    "slowfast_8x8_r101": 126.4,
}


@cache
def preset_gflops(preset: str, size: int = 256, batch_norm: bool = True) -> float:
    return gflops(preset, size=size, batch_norm=batch_norm)


@pytest.mark.parametrize("preset", sorted(REFERENCE_GFLOPS))
def test_reference_gflops_within_two_percent(preset):
    assert preset_gflops(preset, size=256) == pytest.approx(REFERENCE_GFLOPS[preset], rel=0.02)


@pytest.mark.parametrize("preset", sorted(REFERENCE_GFLOPS))
def test_reference_gflops_round_to_the_published_figure(preset):
    # Counting batch norm as fvcore does reproduces the reference to its last digit.
    assert round(preset_gflops(preset, size=256), 1) == REFERENCE_GFLOPS[preset]


def test_conv_and_linear_alone_match_the_model_zoo():
    # PySlowFast / pytorchvideo model zoos, counted before fvcore added batch norm.
    assert round(preset_gflops("slowfast_8x8_r50", batch_norm=False), 2) == 65.71
    assert round(preset_gflops("slow_8x8_r50", batch_norm=False), 2) == 54.52


def test_flops_scale_with_the_architecture():
    g = {
        name: preset_gflops(name)
        for name in ("slowfast_4x16_r50", "slowfast_8x8_r50", "slowfast_8x8_r101", "slow_8x8_r50")
    }
    assert g["slowfast_4x16_r50"] < g["slowfast_8x8_r50"] < g["slowfast_8x8_r101"]
    # The fast pathway is light: SlowFast 8x8 costs about 20% more than Slow-only 8x8 (paper, Table 2).
    assert 1.1 < g["slowfast_8x8_r50"] / g["slow_8x8_r50"] < 1.3
    # 4x16 -> 8x8 doubles the slow pathway's frames; the fast pathway sees 32 frames in both.
    assert g["slowfast_8x8_r50"] / g["slowfast_4x16_r50"] == pytest.approx(1.8, abs=0.1)
    # Convolutions are linear in the number of pixels.
    ratio_224 = preset_gflops("slowfast_8x8_r50", size=224) / g["slowfast_8x8_r50"]
    assert ratio_224 == pytest.approx((224 / 256) ** 2, rel=0.01)


def test_meta_count_equals_a_real_run_and_keeps_the_model_state():
    model = build("slowfast_tiny", num_classes=7).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = example_inputs(model.cfg, batch=2, size=64)
    on_meta = count_flops(model, inputs)
    assert on_meta == count_flops(model, inputs, meta=False)
    assert on_meta == 2 * count_flops(model, example_inputs(model.cfg, batch=1, size=64))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert gflops(model, size=64) * 1e9 == on_meta / 2
