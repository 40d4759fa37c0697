"""Fine-tuning, the library half: a checkpoint of other classes loads with the backbone exact and the head
re-initialised (rows of shared class names kept), frozen stages and frozen batch norm stay fixed through
real training steps on real (synthetic, H.264-encoded) clips, and the head learns at its own rate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slowfast.model import (
    CheckpointError,
    FrozenBatchNorm3d,
    build,
    check_checkpoint,
    export_checkpoint,
    freeze_batch_norm,
    freeze_stages,
    load_checkpoint,
    resolve,
    save_checkpoint,
)
from slowfast.train import build_optimizer, clip_inputs, train_step
from slowfast.video import synth
from slowfast.video.decode import decode_frames
from slowfast.video.sampling import slow_indices

PRESET = "slowfast_tiny"
HEAD = ("head.fc.weight", "head.fc.bias")
CLASSES = ["bouncing", "pulsing", "wobbling", "jittering", "scrolling up", "scrolling down"]
FMT = torch.contiguous_format


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two clips of two motion classes, encoded with PyAV and decoded back: a loader batch for train_step."""
    cfg = resolve(PRESET)
    folder = tmp_path_factory.mktemp("videos")
    clips = []
    for label in (0, 1):
        spec = synth.sample_video(seed=0, class_index=label, video_index=0, width=32, height=32, seconds=1.0)
        path = synth.encode_video(folder / f"{label}.mp4", synth.render(spec), spec.fps)
        clips.append(decode_frames(path, np.arange(cfg.fast_frames) / float(spec.fps), short_side=None))
    return {
        "fast": torch.from_numpy(np.stack(clips)),
        "slow_index": torch.from_numpy(np.tile(slow_indices(cfg.alpha, cfg.T), (2, 1))),
        "label": torch.tensor([0, 1]),
    }


def trained_source(batch, num_classes: int) -> nn.Module:
    """A network whose batch-norm statistics have moved off their initial values, like a trained one's."""
    torch.manual_seed(num_classes)
    model = build(PRESET, num_classes=num_classes).train()
    with torch.no_grad():
        model(clip_inputs(batch, FMT))
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- a checkpoint of other classes --------------------------------------------------------------


def test_400_class_checkpoint_into_a_6_class_model_loads_the_backbone_and_reinitialises_the_head(tmp_path, batch):
    source = trained_source(batch, num_classes=400)
    path = export_checkpoint(source, tmp_path / "SLOWFAST_KINETICS400.pkl", "caffe2")  # foreign: no class names
    model = build(PRESET, num_classes=6)
    before = snapshot(model)

    with pytest.raises(
        CheckpointError,
        match="build the model with num_classes=400; or keep the model's classes and load with head='auto'",
    ):
        load_checkpoint(model, path)
    info = load_checkpoint(model, path, head="auto", class_names=CLASSES)

    theirs, mine = source.state_dict(), model.state_dict()
    backbone = [k for k in mine if k not in HEAD and not k.endswith("num_batches_tracked")]
    for key in backbone:
        assert torch.equal(mine[key], theirs[key]), key
    assert not torch.equal(mine["slow.res2.0.a.bn.running_mean"], before["slow.res2.0.a.bn.running_mean"])
    for key in HEAD:
        assert torch.equal(mine[key], before[key]), key  # the model's own initialisation
    assert (info.format, info.loaded, info.reinitialised, info.kept_classes, info.checkpoint_classes) == (
        "caffe2",
        len(backbone),
        HEAD,
        (),
        400,
    )
    assert info.summary() == (
        f"loaded {len(backbone)} tensors from {path} (caffe2); re-initialised head.fc.weight, "
        "head.fc.bias (checkpoint: 400 classes), kept the rows of 0 shared classes"
    )
    # The driver's check: the same verdict on a config, without a model in memory.
    assert check_checkpoint(model.cfg, path, head="auto", class_names=CLASSES) == info


def test_rows_of_shared_class_names_are_kept(tmp_path, batch):
    source = trained_source(batch, num_classes=6)
    path = save_checkpoint(source, tmp_path / "model.pt", class_names=CLASSES)
    theirs = source.state_dict()

    names = ["jittering", "falling", "bouncing", "spinning"]
    model = build(PRESET, num_classes=4)
    before = snapshot(model)
    info = load_checkpoint(model, path, head="auto", class_names=names)
    assert info.kept_classes == ("jittering", "bouncing") and info.reinitialised == HEAD
    for key in HEAD:
        value = model.state_dict()[key]
        assert torch.equal(value[0], theirs[key][3]) and torch.equal(value[2], theirs[key][0])
        assert torch.equal(value[1], before[key][1]) and torch.equal(value[3], before[key][3])
    assert "kept the rows of 2 shared classes: jittering, bouncing" in info.summary()

    # Same classes in another order: every row comes from the checkpoint, nothing is re-initialised.
    model = build(PRESET, num_classes=6)
    info = load_checkpoint(model, path, head="auto", class_names=CLASSES[::-1])
    assert info.reinitialised == () and info.kept_classes == tuple(CLASSES[::-1])
    assert info.loaded == len([k for k in theirs if not k.endswith("num_batches_tracked")])
    assert torch.equal(model.head.fc.weight, theirs["head.fc.weight"].flip(0))

    # Same classes in the same order: the head loads as it is.
    info = load_checkpoint(build(PRESET, num_classes=6), path, head="auto", class_names=CLASSES)
    assert info.reinitialised == () and info.kept_classes == tuple(CLASSES)


def test_foreign_checkpoint_with_class_names_given_keeps_rows(tmp_path, batch):
    source = trained_source(batch, num_classes=6)
    path = export_checkpoint(source, tmp_path / "model.pth", "mmaction2")
    model = build(PRESET, num_classes=6)
    before = snapshot(model)
    # Same class count, names on neither side: "auto" keeps the head and says it took the rows on trust...
    info = load_checkpoint(build(PRESET, num_classes=6), path, head="auto", class_names=CLASSES)
    assert info.reinitialised == () and info.unnamed_head
    assert "names no classes" in info.summary() and "6-class classifier" in info.summary()
    # ... "reinit" is the user saying they are other classes.
    info = load_checkpoint(model, path, head="reinit")
    assert info.reinitialised == HEAD and not info.unnamed_head
    assert torch.equal(model.head.fc.bias, before["head.fc.bias"])

    info = load_checkpoint(
        model, path, head="auto", class_names=["pulsing", "a", "b", "c", "d", "e"], checkpoint_classes=CLASSES
    )
    assert info.kept_classes == ("pulsing",)
    assert torch.equal(model.head.fc.weight[0], source.head.fc.weight[1])


def test_class_name_counts_must_match_the_classifiers(tmp_path):
    path = export_checkpoint(build(PRESET, num_classes=6), tmp_path / "model.pyth", "pyslowfast")
    with pytest.raises(ValueError, match="class_names .the model's classes. has 2 class names for 6 classes"):
        load_checkpoint(build(PRESET, num_classes=6), path, head="auto", class_names=["a", "b"])
    with pytest.raises(CheckpointError, match=f"{path} .its classifier. has 3 class names for 6 classes"):
        load_checkpoint(build(PRESET, num_classes=6), path, head="auto", checkpoint_classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="head must be 'strict', 'auto' or 'reinit', got 'keep'"):
        load_checkpoint(build(PRESET, num_classes=6), path, head="keep")


def test_a_backbone_that_does_not_fit_is_refused_whatever_the_head_policy(tmp_path):
    path = export_checkpoint(build(PRESET, num_classes=400, fusion_kernel=7), tmp_path / "model.pyth", "pyslowfast")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve(PRESET, num_classes=6), path, head="reinit")
    message = str(err.value)
    assert "the checkpoint's network has fusion_kernel=7 where the model has fusion_kernel=5" in message
    assert "to load it: build the model with fusion_kernel=7 (preset slowfast_tiny with fusion_kernel=7)" in message
    # The four laterals; the head, which "reinit" replaces anyway, is not listed.
    assert "shape mismatch (4)" in message and "head.fc" not in message


# --- frozen stages, frozen batch norm, the head's learning rate ------------------------------------


def test_frozen_stages_stay_identical_through_training(batch):
    torch.manual_seed(0)
    model = build(PRESET, num_classes=2)
    frozen = freeze_stages(model, "res3")
    assert "slow.stem.conv.weight" in frozen and "fast.res3.0.c.bn.bias" in frozen
    assert "lateral.res3.conv.weight" in frozen and not any(".res4." in n or "lateral.res4" in n for n in frozen)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-4)
    in_optimizer = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert not in_optimizer & set(frozen)  # no update, no weight decay
    before = snapshot(model)
    for _ in range(2):
        train_step(model.train(), optimizer, batch, fmt=FMT)

    after = model.state_dict()
    stages = ("stem", "res2", "res3")
    fixed = [k for k in after if k.split(".")[1] in stages and k.split(".")[0] in ("slow", "fast", "lateral")]
    assert len(fixed) > len(frozen)  # the batch-norm statistics too
    for key in fixed:
        assert torch.equal(after[key], before[key]), key
    moved = ("slow.res4.0.a.conv.weight", "fast.res5.0.b.bn.running_mean", "lateral.res4.conv.weight", "head.fc.bias")
    for key in moved:
        assert not torch.equal(after[key], before[key]), key
    assert not model.slow.res2[0].a.bn.training and model.slow.res4[0].a.bn.training


def test_frozen_batch_norm_keeps_statistics_and_affine(tmp_path, batch):
    torch.manual_seed(0)
    model = build(PRESET, num_classes=2)
    keys = list(model.state_dict())
    count = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert freeze_batch_norm(model) == count and freeze_batch_norm(model) == 0
    assert list(model.state_dict()) == keys
    bns = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm3d)]
    assert len(bns) == count
    before = snapshot(model)
    optimizer = build_optimizer(model, lr=0.1)
    for _ in range(2):
        train_step(model.train(), optimizer, batch, fmt=FMT)

    after = model.state_dict()
    for name in bns:
        for tensor in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[f"{name}.{tensor}"], before[f"{name}.{tensor}"]), f"{name}.{tensor}"
        assert not model.get_submodule(name).training
    assert not torch.equal(after["slow.res2.0.a.conv.weight"], before["slow.res2.0.a.conv.weight"])

    # Frozen or not, the checkpoint is the same network's.
    path = save_checkpoint(model, tmp_path / "model.pt")
    for restored in (build(PRESET, num_classes=2), model):
        load_checkpoint(restored, path)
        assert all(torch.equal(v, after[k]) for k, v in restored.state_dict().items())


def test_head_learns_at_its_multiple_of_the_backbone_rate(batch):
    deltas = {}
    for mult in (1.0, 10.0):
        torch.manual_seed(0)
        model = build(PRESET, num_classes=2)
        optimizer = build_optimizer(model, lr=0.5, weight_decay=1e-4, head_lr_mult=mult)
        groups = {
            tuple(g["param_names"]): (g["lr"], g["weight_decay"], g.get("lr_mult")) for g in optimizer.param_groups
        }
        if mult != 1.0:
            assert groups[("head.fc.weight",)] == (5.0, 1e-4, 10.0)
            assert groups[("head.fc.bias",)] == (5.0, 0.0, 10.0)
            assert sum(lr == 0.5 for lr, _, _ in groups.values()) == 2  # the backbone's two groups
        before = snapshot(model)
        torch.manual_seed(1)  # the same dropout mask in both runs
        train_step(model.train(), optimizer, batch, fmt=FMT)
        deltas[mult] = {k: v - before[k] for k, v in model.state_dict().items() if v.is_floating_point()}
    # One step from the same weights on the same clips: the head moves 10x as far (to float32 round-off of
    # weights near 0.01), the backbone alike.
    for key in HEAD:
        torch.testing.assert_close(deltas[10.0][key], 10 * deltas[1.0][key], rtol=1e-3, atol=1e-7)
    backbone = "slow.res5.0.shortcut.conv.weight"
    assert deltas[1.0][backbone].abs().max() > 0
    torch.testing.assert_close(deltas[10.0][backbone], deltas[1.0][backbone])

    with pytest.raises(ValueError, match="head_lr_mult=10.0 needs a classifier module named 'head'; Sequential"):
        build_optimizer(nn.Sequential(nn.Linear(2, 2)), lr=0.1, head_lr_mult=10.0)
    with pytest.raises(ValueError, match="head_lr_mult must be > 0, got 0"):
        build_optimizer(model, lr=0.1, head_lr_mult=0)
