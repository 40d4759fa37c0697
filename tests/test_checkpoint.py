"""Checkpoint import against the reference implementation: pytorchvideo's networks and ours give the
same logits once the weights go through load_checkpoint; PySlowFast key names; own-format round trip;
error messages that list what does not fit.
"""

import pickle
import re
import types

import pytest
import torch

from slowfast.model import CheckpointError, build, export_state_dict, load_checkpoint, save_checkpoint
from slowfast.model.checkpoint import build_from_checkpoint

from reference import assert_same_logits, assert_same_state, logits, pytorchvideo, randomize

# pytorchvideo's hub heads at 224 px: AvgPool3d with kernel (8, 7, 7) for slow and (32, 7, 7) for fast,
# stride 1, then `output_pool` AdaptiveAvgPool3d(1). Only a res5 map of exactly 8 x 7 x 7 / 32 x 7 x 7
# (input 224 px, 8 and 32 frames) makes that a global average as in our head: smaller inputs fail,
# larger ones average overlapping windows. The hub sets no head_activation, so in eval mode the
# reference returns logits, like ours. (PySlowFast's own head, by contrast, applies softmax in eval.)
SIZE, SLOW_FRAMES, FAST_FRAMES = 224, 8, 32


@pytest.fixture(scope="module")
def hub():
    return pytorchvideo().hub


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(1, 3, SLOW_FRAMES, SIZE, SIZE, generator=g),
        torch.randn(1, 3, FAST_FRAMES, SIZE, SIZE, generator=g),
    ]


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


@pytest.mark.parametrize(
    "reference, preset", [("slowfast_r50", "slowfast_8x8_r50"), ("slowfast_r101", "slowfast_8x8_r101")]
)
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
    for reference, preset, fresh in (
        (slowfast_r50, "slowfast_8x8_r50", hub.slowfast_r50),
        (slow_r50, "slow_8x8_r50", hub.slow_r50),
    ):
        model = build(preset)
        load_checkpoint(model, reference.state_dict())
        target = fresh(pretrained=False)
        target.load_state_dict(export_state_dict(model, "pytorchvideo"), strict=True)
        assert_same_state(target, reference)


# pytorchvideo -> PySlowFast key names, written from PySlowFast's module names
# (slowfast/models/video_model_builder.py, stem_helper.py, resnet_helper.py, head_helper.py) and
# independent of checkpoint.py: stage blocks.i is s{i+1}; lateral multipathway_fusion is s{i+1}_fuse.
_PV_TO_PYSLOWFAST = [
    (
        r"blocks\.0\.multipathway_blocks\.(\d)\.(conv|norm)\.",
        lambda m: f"s1.pathway{m[1]}_stem.{'conv' if m[2] == 'conv' else 'bn'}.",
    ),
    (
        r"blocks\.(\d)\.multipathway_fusion\.(conv_fast_to_slow|norm)\.",
        lambda m: f"s{int(m[1]) + 1}_fuse.{'conv_f2s' if m[2] == 'conv_fast_to_slow' else 'bn'}.",
    ),
    (
        r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch1_(conv|norm)\.",
        lambda m: f"s{int(m[1]) + 1}.pathway{m[2]}_res{m[3]}.branch1{'' if m[4] == 'conv' else '_bn'}.",
    ),
    (
        r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch2\.(conv|norm)_([abc])\.",
        lambda m: f"s{int(m[1]) + 1}.pathway{m[2]}_res{m[3]}.branch2.{m[5]}{'' if m[4] == 'conv' else '_bn'}.",
    ),
    (r"blocks\.6\.proj\.", lambda m: "head.projection."),
]


def to_pyslowfast(key: str) -> str:
    for pattern, replace in _PV_TO_PYSLOWFAST:
        m = re.match(pattern, key)
        if m:
            return replace(m) + key[m.end() :]
    raise AssertionError(f"no PySlowFast name for {key}")


def test_pyslowfast_checkpoint_gives_the_reference_logits(slowfast_r50, slowfast_r50_logits, clip):
    state = {to_pyslowfast(k): v for k, v in slowfast_r50.state_dict().items()}
    for key in (
        "s1.pathway0_stem.conv.weight",
        "s1.pathway1_stem.bn.running_var",
        "s1_fuse.conv_f2s.weight",
        "s4_fuse.bn.bias",
        "s2.pathway0_res0.branch1.weight",
        "s2.pathway0_res0.branch1_bn.running_mean",
        "s5.pathway1_res2.branch2.c_bn.weight",
        "s4.pathway0_res5.branch2.a.weight",
        "head.projection.weight",
        "head.projection.bias",
    ):
        assert key in state, key
    model = build("slowfast_8x8_r50")
    # Our documented reverse mapping names the same keys as the independent one above.
    assert set(export_state_dict(model, "pyslowfast")) == set(state)

    # A .pyth as PySlowFast writes it: weights under model_state, beside epoch, optimizer and cfg;
    # here with the "model." prefix some exports carry.
    checkpoint = {
        "epoch": 196,
        "model_state": {f"model.{k}": v for k, v in state.items()},
        "optimizer_state": {},
        "cfg": "MODEL:\n  ARCH: slowfast\n",
    }
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
    state = {
        re.sub(r"^s1\.pathway(\d)_stem\.", r"s1.s\1_stem.", k): v
        for k, v in export_state_dict(model, "pyslowfast").items()
    }
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


def test_build_from_checkpoint_makes_the_network_it_saved(tmp_path):
    torch.manual_seed(0)
    model = build("slowfast_tiny", num_classes=3, alpha=8)
    path = save_checkpoint(model, tmp_path / "last.pt", class_names=["a", "b", "c"])
    built, info = build_from_checkpoint(path)
    assert built.cfg == model.cfg and info.extra["class_names"] == ["a", "b", "c"]
    assert_same_state(built, model)
    # A bare state dict loads into a model you build, but says nothing of which model to build.
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt: not a checkpoint written by this project"):
        build_from_checkpoint(tmp_path / "bare.pt")


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
    state = {
        "format": "slowfast-pipeline",
        "version": 1,
        "config": tiny(alpha=8).cfg.model_dump(),
        "model_state": tiny(alpha=8).state_dict(),
    }
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
    with pytest.raises(
        CheckpointError, match=re.escape("fast.stem.conv.weight: checkpoint (4, 3, 3, 7, 7) vs model (4, 3, 5, 7, 7)")
    ):
        load_checkpoint(tiny(), state)


def test_fusion_kernel_mismatch_says_which_kernel_to_build():
    with pytest.raises(CheckpointError, match="build the model with fusion_kernel=7"):
        load_checkpoint(tiny(fusion_kernel=5), tiny(fusion_kernel=7).state_dict())


def test_unknown_format_names_the_supported_ones():
    # A torchvision 2D ResNet's keys: no SlowFast implementation's.
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format") as err:
        load_checkpoint(
            tiny(),
            {"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)},
        )
    message = str(err.value)
    assert "conv1.weight" in message
    for supported in ("save_checkpoint", "pytorchvideo", "PySlowFast .pyth", "Caffe2 .pkl", "mmaction2"):
        assert supported in message


def test_head_mismatch_says_which_num_classes_to_build(slowfast_r50):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build("slowfast_8x8_r50", num_classes=10), slowfast_r50.state_dict())
    message = str(err.value)
    assert "pytorchvideo" in message
    assert (
        "to load it: build the model with num_classes=400; or keep the model's classes and load with "
        "head='auto' to re-initialise the classifier"
    ) in message
    assert "head.fc.weight: checkpoint (400, 2304) vs model (10, 2304)" in message
    assert "head.fc.bias: checkpoint (400,) vs model (10,)" in message
    assert "shape mismatch (2)" in message  # nothing else


def test_depth_mismatch_is_summarised(slowfast_r101):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build("slowfast_8x8_r50"), slowfast_r101.state_dict())
    message = str(err.value)
    # pytorchvideo's slowfast_r101 also has the 5-frame lateral kernel of the paper's R101 (the R50's is 7).
    assert (
        "the checkpoint's network has depth=101, fusion_kernel=5 where the model has depth=50, fusion_kernel=7"
        in message
    )
    assert "to load it: build the model with depth=101, fusion_kernel=5 (preset slowfast_8x8_r101)" in message
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
    with pytest.raises(CheckpointError, match="weights_only=False") as err:
        load_checkpoint(tiny(), path)
    # One line, naming what was refused (torch's own message is a paragraph of advice around it).
    assert str(err.value) == (
        f"{path}: cannot be read as a weights-only torch checkpoint (UnpicklingError: "
        "Unsupported global: GLOBAL types.SimpleNamespace was not an allowed global by default). "
        "If you trust the file, load it with torch.load(path, weights_only=False) and pass the "
        "dict"
    )
