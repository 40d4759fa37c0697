"""Checkpoint import against the reference implementation: pytorchvideo's networks and ours give the
same logits once the weights go through load_checkpoint; PySlowFast key names; own-format round trip;
error messages that list what does not fit.
"""
import importlib
import importlib.util
import pickle
import re
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from slowfast.model import CheckpointError, build, export_state_dict, load_checkpoint, save_checkpoint

# pytorchvideo's hub heads at 224 px: AvgPool3d with kernel (8, 7, 7) for slow and (32, 7, 7) for fast,
# stride 1, then `output_pool` AdaptiveAvgPool3d(1). Only a res5 map of exactly 8 x 7 x 7 / 32 x 7 x 7
# (input 224 px, 8 and 32 frames) makes that a global average as in our head: smaller inputs fail,
# larger ones average overlapping windows. The hub sets no head_activation, so in eval mode the
# reference returns logits, like ours. (PySlowFast's own head, by contrast, applies softmax in eval.)
SIZE, SLOW_FRAMES, FAST_FRAMES = 224, 8, 32
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hub():
    """pytorchvideo.models.hub, importable without torchvision.

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
            return importlib.import_module("pytorchvideo.models.hub")


def randomize(model: nn.Module, frames: tuple[int, ...], seed: int) -> nn.Module:
    """Random weights and random batch-norm statistics (zero-initialised gammas included).

    Purely random running statistics would let activations grow geometrically through 100 layers,
    and float32 round-off with them; so each BN's statistics are drawn around what it actually sees
    (mean + noise, variance x U(0.5, 2)), in one eval-mode pass of the backbone.
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
                m.weight.normal_(0, m.in_features ** -0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        model.eval()
        x = [torch.randn(1, 3, t, 112, 112, generator=g) for t in frames]
        x = x if len(x) > 1 else x[0]
        for block in model.blocks[:5]:  # stem and res2..res5; the head's pool needs 224 px
            x = block(x)
    for hook in hooks:
        hook.remove()
    return model


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 3, SLOW_FRAMES, SIZE, SIZE, generator=g),
            torch.randn(1, 3, FAST_FRAMES, SIZE, SIZE, generator=g)]


@pytest.fixture(scope="module")
def slowfast_r50(hub):
    return randomize(hub.slowfast_r50(pretrained=False), (SLOW_FRAMES, FAST_FRAMES), seed=1)


@pytest.fixture(scope="module")
def slowfast_r101(hub):
    return randomize(hub.slowfast_r101(pretrained=False), (SLOW_FRAMES, FAST_FRAMES), seed=2)


@pytest.fixture(scope="module")
def slow_r50(hub):
    return randomize(hub.slow_r50(pretrained=False), (SLOW_FRAMES,), seed=3)


# Reference logits, computed once: the pytorchvideo and PySlowFast import tests both compare with them.
@pytest.fixture(scope="module")
def slowfast_r50_logits(slowfast_r50, clip):
    return logits(slowfast_r50, clip)


@pytest.fixture(scope="module")
def slowfast_r101_logits(slowfast_r101, clip):
    return logits(slowfast_r101, clip)


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


@pytest.mark.parametrize("reference, preset", [("slowfast_r50", "slowfast_8x8_r50"),
                                               ("slowfast_r101", "slowfast_8x8_r101")])
def test_pytorchvideo_slowfast_weights_give_the_reference_logits(request, clip, reference, preset):
    state = request.getfixturevalue(reference).state_dict()
    if preset.endswith("r101"):
        # Checkpoints written without BN step counters load too.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = build(preset)
    info = load_checkpoint(model, state)
    assert (info.format, info.pathways) == ("pytorchvideo", 2)
    assert len(model.slow.res4) == (23 if preset.endswith("r101") else 6)
    assert_same_logits(request.getfixturevalue(f"{reference}_logits"), logits(model, clip))


def test_pytorchvideo_slow_only_weights_give_the_reference_logits(slow_r50, clip):
    model = build("slow_8x8_r50")
    # The pytorchvideo model zoo stores its state dict under "model_state".
    info = load_checkpoint(model, {"model_state": slow_r50.state_dict()})
    assert (info.format, info.pathways) == ("pytorchvideo", 1)
    with torch.no_grad():
        expected = slow_r50.eval()(clip[0])
    assert_same_logits(expected, logits(model, clip[:1]))
    assert_same_logits(expected, logits(model, clip))  # [slow, fast]: the fast clip is ignored


def test_export_to_pytorchvideo_loads_strictly_into_the_reference(hub, slowfast_r50, slow_r50):
    for reference, preset, fresh in ((slowfast_r50, "slowfast_8x8_r50", hub.slowfast_r50),
                                     (slow_r50, "slow_8x8_r50", hub.slow_r50)):
        model = build(preset)
        load_checkpoint(model, reference.state_dict())
        target = fresh(pretrained=False)
        target.load_state_dict(export_state_dict(model, "pytorchvideo"), strict=True)
        assert_same_state(target, reference)


# pytorchvideo -> PySlowFast key names, written from PySlowFast's module names
# (slowfast/models/video_model_builder.py, stem_helper.py, resnet_helper.py, head_helper.py) and
# independent of checkpoint.py: stage blocks.i is s{i+1}; lateral multipathway_fusion is s{i+1}_fuse.
_PV_TO_PYSLOWFAST = [
    (r"blocks\.0\.multipathway_blocks\.(\d)\.(conv|norm)\.",
     lambda m: f"s1.pathway{m[1]}_stem.{'conv' if m[2] == 'conv' else 'bn'}."),
    (r"blocks\.(\d)\.multipathway_fusion\.(conv_fast_to_slow|norm)\.",
     lambda m: f"s{int(m[1]) + 1}_fuse.{'conv_f2s' if m[2] == 'conv_fast_to_slow' else 'bn'}."),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch1_(conv|norm)\.",
     lambda m: f"s{int(m[1]) + 1}.pathway{m[2]}_res{m[3]}.branch1{'' if m[4] == 'conv' else '_bn'}."),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch2\.(conv|norm)_([abc])\.",
     lambda m: f"s{int(m[1]) + 1}.pathway{m[2]}_res{m[3]}.branch2.{m[5]}{'' if m[4] == 'conv' else '_bn'}."),
    (r"blocks\.6\.proj\.", lambda m: "head.projection."),
]


def to_pyslowfast(key: str) -> str:
    for pattern, replace in _PV_TO_PYSLOWFAST:
        m = re.match(pattern, key)
        if m:
            return replace(m) + key[m.end():]
    raise AssertionError(f"no PySlowFast name for {key}")


def test_pyslowfast_checkpoint_gives_the_reference_logits(slowfast_r50, slowfast_r50_logits, clip):
    state = {to_pyslowfast(k): v for k, v in slowfast_r50.state_dict().items()}
    for key in ("s1.pathway0_stem.conv.weight", "s1.pathway1_stem.bn.running_var", "s1_fuse.conv_f2s.weight",
                "s4_fuse.bn.bias", "s2.pathway0_res0.branch1.weight", "s2.pathway0_res0.branch1_bn.running_mean",
                "s5.pathway1_res2.branch2.c_bn.weight", "s4.pathway0_res5.branch2.a.weight",
                "head.projection.weight", "head.projection.bias"):
        assert key in state, key
    model = build("slowfast_8x8_r50")
    # Our documented reverse mapping names the same keys as the independent one above.
    assert set(export_state_dict(model, "pyslowfast")) == set(state)

    # A .pyth as PySlowFast writes it: weights under model_state, beside epoch, optimizer and cfg;
    # here with the "model." prefix some exports carry.
    checkpoint = {"epoch": 196, "model_state": {f"model.{k}": v for k, v in state.items()},
                  "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: slowfast\n"}
    info = load_checkpoint(model, checkpoint)
    assert (info.format, info.pathways) == ("pyslowfast", 2)
    assert info.extra["epoch"] == 196
    assert_same_logits(slowfast_r50_logits, logits(model, clip))

    for prefix in ("", "module."):
        other = build("slowfast_8x8_r50")
        assert load_checkpoint(other, {"model_state": {prefix + k: v for k, v in state.items()}}).format == "pyslowfast"
        assert_same_state(other, model)


def test_pyslowfast_r101_keys_map_every_block(slowfast_r101):
    state = {to_pyslowfast(k): v for k, v in slowfast_r101.state_dict().items()}
    assert "s4.pathway1_res22.branch2.c_bn.running_var" in state
    model = build("slowfast_8x8_r101")
    load_checkpoint(model, {"model_state": state})
    assert torch.equal(model.slow.res4[22].c.bn.running_var, state["s4.pathway0_res22.branch2.c_bn.running_var"])
    assert torch.equal(model.lateral["res4"].conv.weight, state["s4_fuse.conv_f2s.weight"])


def test_pyslowfast_early_stem_names_load():
    model = tiny()
    state = {re.sub(r"^s1\.pathway(\d)_stem\.", r"s1.s\1_stem.", k): v
             for k, v in export_state_dict(model, "pyslowfast").items()}
    assert "s1.s1_stem.conv.weight" in state
    restored = tiny()
    assert load_checkpoint(restored, {"model_state": state}).pathways == 2
    assert torch.equal(restored.fast.stem.conv.weight, model.fast.stem.conv.weight)


# --- this project's format -------------------------------------------------------------------

def tiny(**overrides):
    return build("slowfast_tiny", num_classes=5, **overrides)


def test_own_format_round_trip_through_a_file(tmp_path):
    torch.manual_seed(0)
    model = tiny().train()
    inputs = [torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 16, 32, 32)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        model(inputs)  # train mode: moves the BN running statistics
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # random gradients: Conv3d backward on CPU takes seconds
    optimizer.step()  # moves the weights (zero-initialised gammas included) and fills the momentum
    path = save_checkpoint(model, tmp_path / "ckpt" / "last.pt", epoch=3, optimizer=optimizer.state_dict())

    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert (raw["format"], raw["version"], raw["config"]["depth"]) == ("slowfast-pipeline", 1, 14)

    restored = tiny()
    info = load_checkpoint(restored, str(path))
    assert info.format == "slowfast-pipeline" and info.extra["epoch"] == 3
    assert info.extra["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert_same_state(restored, model)
    assert torch.equal(logits(model, inputs), logits(restored, inputs))


def test_bare_state_dict_with_wrapper_prefix_and_without_step_counters():
    model, restored = tiny(), tiny()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert load_checkpoint(restored, state).format == "slowfast-pipeline"
    assert torch.equal(restored.slow.res2[0].a.conv.weight, model.slow.res2[0].a.conv.weight)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "last.pt", epoch=1)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(tiny(), path, epoch=2, callback=lambda: None)  # a lambda cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(tiny(), path).extra["epoch"] == 1


def test_config_difference_that_keeps_shapes_warns():
    state = {"format": "slowfast-pipeline", "version": 1, "config": tiny(alpha=8).cfg.model_dump(),
             "model_state": tiny(alpha=8).state_dict()}
    with pytest.warns(UserWarning, match="alpha: checkpoint 8 vs model 4"):
        load_checkpoint(tiny(), state)


# --- errors ----------------------------------------------------------------------------------

def test_missing_keys_are_all_listed_and_the_model_is_left_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = tiny().state_dict()
    gone = ["slow.res2.0.a.conv.weight", "fast.res5.0.shortcut.bn.running_var", "lateral.res3.conv.weight"]
    for key in gone:
        del state[key]
    with pytest.raises(CheckpointError, match="slowfast-pipeline") as err:
        load_checkpoint(model, state)
    assert "missing from the checkpoint (3)" in str(err.value)
    for key in gone:
        assert key in str(err.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unexpected_key_is_listed():
    state = tiny().state_dict()
    state["slow.res2.0.d.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\):\n    slow.res2.0.d.conv.weight"):
        load_checkpoint(tiny(), state)


def test_mis_shaped_tensor_is_listed_with_both_shapes():
    state = tiny().state_dict()
    state["fast.stem.conv.weight"] = torch.zeros(4, 3, 3, 7, 7)
    with pytest.raises(CheckpointError, match=re.escape("fast.stem.conv.weight: checkpoint (4, 3, 3, 7, 7) "
                                                        "vs model (4, 3, 5, 7, 7)")):
        load_checkpoint(tiny(), state)


def test_fusion_kernel_mismatch_says_which_kernel_to_build():
    with pytest.raises(CheckpointError, match="build the model with fusion_kernel=7"):
        load_checkpoint(tiny(fusion_kernel=5), tiny(fusion_kernel=7).state_dict())


def test_unknown_format_names_the_supported_ones():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format") as err:
        load_checkpoint(tiny(), {"backbone.conv1.weight": torch.zeros(1), "cls_head.fc_cls.weight": torch.zeros(1)})
    message = str(err.value)
    assert "backbone.conv1.weight" in message
    for supported in ("save_checkpoint", "pytorchvideo", "PySlowFast"):
        assert supported in message


def test_head_mismatch_says_which_num_classes_to_build(slowfast_r50):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build("slowfast_8x8_r50", num_classes=10), slowfast_r50.state_dict())
    message = str(err.value)
    assert "pytorchvideo" in message
    assert ("head.fc.weight: checkpoint (400, 2304) vs model (10, 2304) — build the model with num_classes=400"
            in message)
    assert "head.fc.bias: checkpoint (400,) vs model (10,)" in message
    assert "shape mismatch (2)" in message  # nothing else


def test_depth_mismatch_is_summarised(slowfast_r101):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build("slowfast_8x8_r50"), slowfast_r101.state_dict())
    message = str(err.value)
    assert ("the checkpoint has (3, 4, 23, 3) blocks in res2..res5, the model (3, 4, 6, 3) (depth 50): "
            "build the model with depth=101") in message
    # 17 extra res4 blocks in each pathway, 15 tensors each (a, b, c: conv weight and 4 BN tensors;
    # step counters are never listed).
    assert "unexpected in the checkpoint (510)" in message and "... and 490 more" in message
    assert len(message.splitlines()) < 60


def test_pathway_mismatch_says_which_arch_to_build(slow_r50):
    with pytest.raises(CheckpointError, match="1 pathway.*arch='slowfast'.*slow_8x8_r50"):
        load_checkpoint(tiny(), slow_r50.state_dict())


def test_unreadable_file_explains_weights_only(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"model_state": {}, "meta": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(tiny(), path)
