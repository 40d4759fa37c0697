"""The SlowFast network: the paper's reference sizes, every fusion and input variant, bad input."""

import pytest
import torch

from slowfast.model import PRESETS, build, count_params, example_inputs
from slowfast.model.slowfast import Bottleneck, FastInput, TimeStridedSampling, TimeToChannel

# Parameter counts of the reference implementation (PySlowFast / pytorchvideo) at 400 classes.
REFERENCE_PARAMS = {
    "slowfast_4x16_r50": 34_480_216,
    "slowfast_8x8_r50": 34_566_488,
    "slowfast_8x8_r101": 62_826_968,
    "slow_8x8_r50": 32_454_096,  # pytorchvideo slow_r50
}


@pytest.mark.parametrize("preset", sorted(REFERENCE_PARAMS))
def test_reference_parameter_counts_are_exact(preset):
    assert count_params(build(preset, num_classes=400)) == REFERENCE_PARAMS[preset]


def test_every_preset_builds_and_classifies():
    for name, cfg in PRESETS.items():
        if cfg.depth > 26:
            continue  # the big ones are covered above; this keeps the test quick
        model = build(name, num_classes=7).eval()
        with torch.no_grad():
            logits = model(example_inputs(model.cfg, batch=2, size=48))
        assert logits.shape == (2, 7), name


def tiny(**overrides):
    return build("slowfast_tiny", num_classes=5, **overrides)


VARIANTS = [
    dict(lateral="time_strided_conv", fusion="concat"),
    dict(lateral="time_strided_conv", fusion="sum"),
    dict(lateral="time_to_channel", fusion="concat"),
    dict(lateral="time_to_channel", fusion="sum", alpha=8, beta=1 / 8),
    dict(lateral="time_strided_sampling", fusion="concat"),
    dict(lateral="time_strided_conv", fusion="concat", fusion_kernel=7, beta="1/4"),
    dict(fast_input="grayscale"),
    dict(fast_input="time_difference"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_variant_shapes_and_gradients_reach_fast_pathway_through_laterals(variant):
    model = tiny(**variant).train()
    slow, fast = example_inputs(model.cfg, batch=2, size=32)
    logits = model([slow, fast])
    assert logits.shape == (2, 5)

    # Back-propagate from the slow pathway's features only: any gradient that reaches the fast
    # stem must have travelled through the lateral connections.
    slow_dim = model.cfg.width * 32
    model.zero_grad()
    model.features([slow, fast])[:, :slow_dim].pow(2).sum().backward()
    fast_grad = model.fast.stem.conv.weight.grad
    assert fast_grad is not None and fast_grad.abs().sum() > 0
    for name in ("stem", "res2", "res3", "res4"):
        assert name in model.lateral


def test_without_laterals_no_gradient_reaches_fast_pathway_from_slow_features():
    model = tiny(lateral="none").train()
    slow, fast = example_inputs(model.cfg, batch=2, size=32)
    model.features([slow, fast])[:, : model.cfg.width * 32].pow(2).sum().backward()
    grad = model.fast.stem.conv.weight.grad
    assert grad is None or grad.abs().sum() == 0
    assert len(model.lateral) == 0


def test_lateral_channel_widths_follow_the_paper():
    # Slow res2 input = C + lateral: time-strided conv adds 2*beta*C, time-to-channel alpha*beta*C,
    # time-strided sampling beta*C.
    def res2_in(**kw):
        return tiny(**kw).slow.res2[0].a.conv.in_channels

    cfg = tiny().cfg
    assert res2_in() == cfg.width + 2 * cfg.fast_width
    assert res2_in(lateral="time_to_channel") == cfg.width + cfg.alpha * cfg.fast_width
    assert res2_in(lateral="time_strided_sampling") == cfg.width + cfg.fast_width
    assert res2_in(lateral="none") == cfg.width
    assert res2_in(fusion="sum") == cfg.width
    assert tiny(fusion_kernel=7).lateral["stem"].conv.kernel_size == (7, 1, 1)
    assert tiny().lateral["stem"].conv.stride == (cfg.alpha, 1, 1)


def test_bare_lateral_is_the_strided_conv_alone():
    # mmaction2's lateral_norm=False: conv (no bias), no BN, no ReLU, so negative outputs survive.
    net = tiny(lateral_norm=False).eval()
    conv = net.lateral["res2"].conv
    x = torch.randn(1, conv.in_channels, 8, 5, 5)
    with torch.no_grad():
        got = net.lateral["res2"](x)
    expected = torch.nn.functional.conv3d(x, conv.weight, stride=conv.stride, padding=conv.padding)
    assert conv.bias is None and (got < 0).any()
    assert torch.equal(got, expected)
    # Only the lateral BNs go: 2 parameters per lateral channel (2 * beta * C * (1, 4, 8, 16) = 16 ... 256).
    bare = count_params(build("slowfast_8x8_r50", lateral_norm=False))
    assert bare == REFERENCE_PARAMS["slowfast_8x8_r50"] - 2 * (16 + 64 + 128 + 256)


def test_time_to_channel_packs_each_run_of_alpha_frames_into_channels():
    alpha, t = 4, 3
    fast = torch.arange(alpha * t, dtype=torch.float32).view(1, 1, alpha * t, 1, 1).repeat(1, 2, 1, 1, 1)
    fast[:, 1] += 100  # tell the two input channels apart
    out = TimeToChannel(alpha)(fast)
    assert out.shape == (1, 2 * alpha, t, 1, 1)
    # Slow step 1 holds fast frames 4..7 of channel 0, then of channel 1.
    assert out[0, :, 1, 0, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert TimeStridedSampling(alpha)(fast)[0, 0, :, 0, 0].tolist() == [0, 4, 8]


def test_fast_input_modes():
    clip = torch.randn(2, 3, 8, 4, 4)
    assert FastInput("rgb")(clip) is clip
    gray = FastInput("grayscale")(clip)
    assert gray.shape == (2, 1, 8, 4, 4)
    assert torch.allclose(gray[:, 0], 0.299 * clip[:, 0] + 0.587 * clip[:, 1] + 0.114 * clip[:, 2])
    diff = FastInput("time_difference")(clip)
    assert diff.shape == clip.shape
    assert torch.equal(diff[:, :, 0], torch.zeros_like(clip[:, :, 0]))
    assert torch.allclose(diff[:, :, 3], clip[:, :, 3] - clip[:, :, 2])
    static = clip[:, :, :1].expand_as(clip)
    assert FastInput("time_difference")(static).abs().max() == 0
    assert tiny(fast_input="grayscale").fast.stem.conv.in_channels == 1


def test_single_pathway_baselines():
    slow_only, fast_only = build("slow_tiny", num_classes=5), build("fast_tiny", num_classes=5)
    assert slow_only.fast is None and len(slow_only.lateral) == 0
    assert fast_only.slow is None and len(fast_only.lateral) == 0
    slow, fast = example_inputs(slow_only.cfg, batch=2, size=32)
    assert slow_only([slow, fast]).shape == (2, 5)
    assert slow_only([slow]).shape == (2, 5)
    assert fast_only([fast]).shape == (2, 5)
    assert fast_only.head.fc.in_features == fast_only.cfg.fast_width * 32
    # A third of the paper's network: Fast-only is ~1/8 the channels, so a tiny fraction of the parameters.
    assert count_params(fast_only) < count_params(slow_only) / 10


def test_any_crop_size_and_logits_in_both_modes():
    model = tiny()
    for size in (32, 56, 80):
        for mode in (model.train, model.eval):
            mode()
            with torch.no_grad():
                out = model(example_inputs(model.cfg, batch=2, size=size))
            assert out.shape == (2, 5)
    # Eval returns logits, not probabilities (PySlowFast's test-mode softmax is not applied here).
    model.eval()
    with torch.no_grad():
        out = model(example_inputs(model.cfg, batch=2, size=32))
    assert not torch.allclose(out.softmax(1), out)


def test_last_batch_norm_of_every_residual_block_starts_at_zero():
    model = tiny()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 2 * 4  # depth 14: one block per stage, two pathways
    assert all(b.c.bn.weight.abs().sum() == 0 for b in blocks)
    assert all(b.a.bn.weight.abs().sum() > 0 for b in blocks)
    assert tiny(zero_init_last_bn=False).slow.res2[0].c.bn.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda s, f: [s], "expected 2 pathways"),
        (lambda s, f: [s, f, f], "expected 2 pathways"),
        (lambda s, f: s, "expected a list"),
        (lambda s, f: [s, f[:, :, :-1]], "expected 4 x 4 = 16, got 15"),
        (lambda s, f: [s[:, :2], f], "expected 3 channels"),
        (lambda s, f: [s, f[:, :1]], "fast pathway: expected 3 channels"),
        (lambda s, f: [s[0], f], "expected 5 dims"),
    ],
)
def test_bad_input_names_expected_and_actual(bad, message):
    model = tiny()
    slow, fast = example_inputs(model.cfg, batch=1, size=32)
    with pytest.raises(ValueError, match=message):
        model(bad(slow, fast))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'slowfast_16x8'.*slowfast_8x8_r50"):
        build("slowfast_16x8")


def test_invalid_configs_are_rejected_before_building():
    with pytest.raises(ValueError, match="alpha \\* beta == 1"):
        tiny(lateral="time_to_channel", fusion="sum")  # alpha 4, beta 1/8: 16 vs 32 channels
    with pytest.raises(ValueError, match="whole number of fast channels"):
        tiny(beta=0.1)
    with pytest.raises(ValueError, match="fusion_kernel must be odd"):
        tiny(fusion_kernel=4)
    with pytest.raises(ValueError, match="lateral"):
        tiny(lateral="optical_flow")
    with pytest.raises(ValueError, match="lateral_norm=False describes the time-strided conv lateral"):
        tiny(lateral="time_to_channel", lateral_norm=False)
