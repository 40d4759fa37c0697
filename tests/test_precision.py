"""bf16 mixed precision: which CPUs get it (their flags), and that a bf16 train step of slowfast_tiny on such a
CPU matches fp32 and still learns."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slowfast.model import build
from slowfast.train import build_optimizer, memory_format
from slowfast.train.optim import autocast, cpu_bf16, describe_precision
from slowfast.train.step import train_step
from slowfast.video import synth
from slowfast.video.sampling import slow_indices

# The "flags" / "Features" lines of real /proc/cpuinfo files, one processor each, shortened.
SAPPHIRE_RAPIDS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 "
    "amx_tile amx_int8\n"
)
ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni\n"
)
ZEN3 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
    "flags\t\t: fpu sse2 avx avx2 fma f16c bmi2 sha_ni vaes vpclmulqdq\n"
)
ICE_LAKE = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bitalg avx512_vpopcntdq\n"
)
GRAVITON3 = (
    "processor\t: 0\nBogoMIPS\t: 2100.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16 "
    "svebf16 dcpop\nCPU implementer\t: 0x41\n"
)
GRAVITON2 = (
    "processor\t: 0\nBogoMIPS\t: 243.75\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
)

NUM_CLASSES = 4


@pytest.mark.parametrize(
    "cpuinfo, supported, reason",
    [
        pytest.param(SAPPHIRE_RAPIDS, True, "avx512_bf16, amx_bf16", id="sapphire_rapids"),
        pytest.param(ZEN4, True, "avx512_bf16", id="zen4"),
        pytest.param(GRAVITON3, True, "bf16", id="graviton3"),
        pytest.param(ZEN3, False, "no avx512_bf16, amx_bf16, bf16 flag in ", id="zen3"),
        # AVX-512 without bf16: oneDNN would emulate it (torch.ops.mkldnn._is_mkldnn_bf16_supported() says yes)
        pytest.param(ICE_LAKE, False, "no avx512_bf16, amx_bf16, bf16 flag in ", id="ice_lake"),
        pytest.param(GRAVITON2, False, "no avx512_bf16, amx_bf16, bf16 flag in ", id="graviton2"),
    ],
)
def test_cpu_flags_decide_bf16(tmp_path, cpuinfo, supported, reason):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    support = cpu_bf16(str(path))
    assert support.supported is supported
    assert support.reason.startswith(reason)
    if not supported:
        assert str(path) in support.reason


def test_unreadable_cpuinfo_means_fp32(tmp_path):
    missing = tmp_path / "no-proc" / "cpuinfo"
    support = cpu_bf16(str(missing))
    assert not support.supported
    assert support.reason == f"cannot read the CPU flags from {missing}: No such file or directory"


def test_this_cpu_autocast_and_its_description_agree():
    support = cpu_bf16()
    with autocast("cpu", enabled=True):
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if support.supported else torch.float32)
    with autocast("cpu", enabled=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    expected = (
        f"bf16 on CPU: supported ({support.reason})"
        if support.supported
        else f"bf16 on CPU: not supported ({support.reason}): fp32"
    )
    assert describe_precision("cpu", True) == expected
    assert describe_precision("cpu", False) == "fp32 (mixed precision off)"
    assert describe_precision("cuda", True) == "bf16 autocast on CUDA"
    assert describe_precision("mps", True) == "fp32 (no bf16 autocast on mps)"
    if support.supported:  # oneDNN must agree, or autocast would run bf16 through slow reference kernels
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if Path("/proc/cpuinfo").exists():
        assert "cannot read" not in support.reason


def fixed_batch(size: int = 32) -> dict:
    """One clip of each of the first NUM_CLASSES synthetic motion classes, as the loader gives them:
    {"fast": uint8 (B, alpha*T, H, W, 3), "slow_index": (B, T), "label"} (see slowfast.train.clip_inputs)."""
    cfg = build("slowfast_tiny", num_classes=NUM_CLASSES).cfg
    stride = cfg.tau // cfg.alpha
    clips = []
    for label in range(NUM_CLASSES):
        spec = synth.sample_video(0, label, 0, width=size, height=size, seconds=cfg.fast_frames * stride / 30)
        clips.append(synth.render(spec, 0, cfg.fast_frames * stride)[::stride])
    slow_index = torch.from_numpy(slow_indices(cfg.alpha, cfg.slow_frames)).repeat(NUM_CLASSES, 1)
    return {"fast": torch.from_numpy(np.stack(clips)), "slow_index": slow_index, "label": torch.arange(NUM_CLASSES)}


def needs_cpu_bf16():
    support = cpu_bf16()
    if not support.supported:
        pytest.skip(
            f"this CPU has no bf16 in hardware ({support.reason}): autocast keeps fp32 here, "
            "so there is no bf16 step to compare"
        )


def test_bf16_step_matches_fp32_on_this_cpu():
    """One train step from the same weights on the same batch: bf16 logits within 0.05 of fp32's, the loss
    fp32, finite and within 0.02 of fp32's. The logits reach about 0.6 here; bf16 keeps 8 significant bits
    (0.4% per rounding) through 14 layers, and emulated bf16 differed by 0.004-0.008 (loss 0.0006-0.003)
    for seeds 0-2."""
    needs_cpu_bf16()
    fmt = memory_format("cpu")
    batch = fixed_batch()
    torch.manual_seed(0)
    fp32_model = build("slowfast_tiny", num_classes=NUM_CLASSES, dropout=0.0).to(memory_format=fmt)
    bf16_model = copy.deepcopy(fp32_model)
    fp32 = train_step(fp32_model, build_optimizer(fp32_model, lr=0.1), batch, fmt=fmt, mixed_precision=False)
    bf16 = train_step(bf16_model, build_optimizer(bf16_model, lr=0.1), batch, fmt=fmt, mixed_precision=True)
    assert fp32.logits.dtype == torch.float32 and bf16.logits.dtype == torch.bfloat16
    assert bf16.loss.dtype == torch.float32 and math.isfinite(bf16.loss.item())
    assert (bf16.logits.float() - fp32.logits).abs().max().item() <= 0.05, (bf16.logits, fp32.logits)
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), abs=0.02)


def test_bf16_steps_fit_a_fixed_batch_on_this_cpu():
    """Four bf16 steps on one fixed batch of 4 clips bring the fp32 loss under a quarter of its first value
    (emulated bf16: 1.51 -> 0.00 by the fourth step, as in fp32)."""
    needs_cpu_bf16()
    fmt = memory_format("cpu")
    batch = fixed_batch()
    torch.manual_seed(0)
    model = build("slowfast_tiny", num_classes=NUM_CLASSES, dropout=0.0).to(memory_format=fmt)
    optimizer = build_optimizer(model, lr=0.1)
    losses = [
        train_step(model, optimizer, batch, fmt=fmt, mixed_precision=True, grad_clip=5.0).loss.item() for _ in range(4)
    ]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.25 * losses[0], losses
