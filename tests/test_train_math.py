"""The math of training: parameter groups, the paper's LR schedule, multi-view video metrics, plots."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from slowfast.model import build, example_inputs, resolve
from slowfast.model.slowfast import Bottleneck
from slowfast.train import (
    LRSchedule,
    MetricsError,
    VideoAggregator,
    autocast,
    build_optimizer,
    clip_gradients,
    confusion_matrix_png,
    learning_curve_png,
    lr_at,
    memory_format,
    param_groups,
    scaled_lr,
    topk_correct,
)

# PySlowFast configs/Kinetics/SLOWFAST_8x8_R50.yaml (SOLVER) with defaults.py's COSINE_END_LR 0.0 and
# COSINE_AFTER_WARMUP False: BASE_LR 0.1 for TRAIN.BATCH_SIZE 64, WARMUP_START_LR 0.01.
KINETICS = dict(base_lr=0.1, warmup_epochs=34, total_epochs=196, warmup_start_lr=0.01, end_lr=0.0)


# --- optimizer ---------------------------------------------------------------------------------------


def test_param_groups_no_decay_on_bn_and_bias():
    model = build("slowfast_tiny", num_classes=5)
    decay, no_decay = param_groups(model, 1e-4)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)
    modules = dict(model.named_modules())
    owner = lambda name: modules[name.rpartition(".")[0]]  # noqa: E731

    for name in no_decay["param_names"]:
        assert isinstance(owner(name), nn.BatchNorm3d) or name.endswith(".bias"), name
    for name, p in zip(decay["param_names"], decay["params"], strict=True):
        assert isinstance(owner(name), (nn.Conv3d, nn.Linear)) and name.endswith(".weight") and p.ndim >= 2, name
    conv_weights = {f"{n}.weight" for n, m in modules.items() if isinstance(m, nn.Conv3d)}
    assert conv_weights <= set(decay["param_names"])
    assert set(decay["param_names"]) == conv_weights | {"head.fc.weight"}
    bn_params = {f"{n}.{w}" for n, m in modules.items() if isinstance(m, nn.BatchNorm3d) for w in ("weight", "bias")}
    assert set(no_decay["param_names"]) == bn_params | {"head.fc.bias"}

    # Every parameter in exactly one group.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_zero_initialised_last_bn_is_not_decayed():
    model = build("slowfast_tiny", num_classes=5)
    last_bns = [f"{n}.c.bn.weight" for n, m in model.named_modules() if isinstance(m, Bottleneck)]
    assert last_bns and all(float(model.get_parameter(n).detach().abs().sum()) == 0 for n in last_bns)
    _, no_decay = param_groups(model, 1e-4)
    assert set(last_bns) <= set(no_decay["param_names"])


def test_param_groups_skip_frozen_and_count_shared_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.BatchNorm1d(4), shared, nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == ["0.bias", "0.weight", "1.bias", "1.weight", "3.bias"]


def test_sgd_step_decays_weights_only_with_nesterov():
    model = nn.Sequential(nn.Conv3d(2, 3, 1, bias=True), nn.BatchNorm3d(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # First Nesterov step on the decay term alone: p -= lr * (1 + momentum) * wd * p.
    torch.testing.assert_close(model[0].weight, before["0.weight"] * (1 - 1.0 * 1.9 * 0.1))
    for name in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(model.get_parameter(name), before[name])


def test_lr_scales_linearly_with_global_batch():
    assert scaled_lr(0.1, 64) == pytest.approx(0.1)  # the reference: 8 GPUs x 8 clips
    assert scaled_lr(0.1, 128) == pytest.approx(0.2)
    assert scaled_lr(0.1, 8) == pytest.approx(0.0125)  # one worker, batch 8
    assert scaled_lr(0.8, 512, reference_batch=512) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="global_batch=0"):
        scaled_lr(0.1, 0)


def test_clip_gradients_returns_norm_and_clips():
    w = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    w.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([w, b], None) == pytest.approx(5.0)
    assert w.grad.tolist() == [3.0, 0.0]  # None = measure, don't clip
    assert clip_gradients([w, b], 1.0) == pytest.approx(5.0)
    assert math.hypot(*w.grad.tolist(), *b.grad.tolist()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_is_fp32_and_layout_channels_last_on_cpu():
    assert memory_format("cpu") == torch.channels_last_3d
    assert memory_format("mps") == torch.contiguous_format
    assert memory_format("cuda") == torch.channels_last_3d
    with autocast("cpu", enabled=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert isinstance(autocast("cuda"), torch.autocast)
    assert not isinstance(autocast("cuda", enabled=False), torch.autocast)


def test_tiny_slowfast_fits_one_batch_with_the_recipe():
    """Optimizer, schedule and clipping together: 6 steps on 4 fixed clips bring the loss down."""
    torch.manual_seed(0)
    cfg = resolve("slowfast_tiny", num_classes=4, dropout=0.0)
    model = build("slowfast_tiny", num_classes=4, dropout=0.0)
    inputs, labels = example_inputs(cfg, batch=4, size=16), torch.arange(4)
    opt = build_optimizer(model, lr=0.0)
    schedule = LRSchedule(base_lr=scaled_lr(0.4, 4, reference_batch=4), warmup_epochs=1, total_epochs=2)
    losses = []
    for step in range(6):
        schedule.step(opt, epoch=step // 3, step=step % 3, steps_per_epoch=3)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        assert math.isfinite(clip_gradients(model, 5.0))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


# --- LR schedule ---------------------------------------------------------------------------------------


def test_kinetics_schedule_figures():
    lr = lambda epoch: lr_at(epoch, **KINETICS)  # noqa: E731
    cos = lambda epoch: 0.05 * (math.cos(math.pi * epoch / 196) + 1)  # noqa: E731
    assert lr(0) == pytest.approx(0.01)  # WARMUP_START_LR
    # The cosine is not offset by the warm-up (COSINE_AFTER_WARMUP False): at the end of warm-up the LR
    # is the cosine's value at epoch 34, 0.0928, not the base 0.1.
    assert lr(34) == pytest.approx(0.0927571381, abs=1e-9) == pytest.approx(cos(34))
    assert lr(17) == pytest.approx((0.01 + 0.0927571381) / 2)  # warm-up is a straight line
    assert lr(34 - 1e-9) == pytest.approx(lr(34))  # continuous at the hand-over
    assert lr(98) == pytest.approx(0.05)  # half-way through the cosine
    assert lr(196) == pytest.approx(0.0, abs=1e-12)  # COSINE_END_LR
    assert lr(250) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at the end
    warmup = [lr(e) for e in np.linspace(0, 34, 50)]
    decay = [lr(e) for e in np.linspace(34, 196, 50)]
    assert all(a < b for a, b in zip(warmup, warmup[1:], strict=False))
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_warmup_start_defaults_to_a_tenth_of_the_scaled_base():
    args = dict(warmup_epochs=34, total_epochs=196)
    assert lr_at(0, base_lr=0.1, **args) == pytest.approx(0.01)
    assert lr_at(0, base_lr=scaled_lr(0.1, 512), **args) == pytest.approx(0.08)  # 64 GPUs x 8 clips
    assert lr_at(0, base_lr=0.1, warmup_epochs=0, total_epochs=196) == pytest.approx(0.1)
    assert lr_at(98, base_lr=0.1, warmup_epochs=0, total_epochs=196, end_lr=0.001) == pytest.approx(0.0505)


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_epochs=40, total_epochs=30"):
        lr_at(0, base_lr=0.1, warmup_epochs=40, total_epochs=30)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        lr_at(-1, **KINETICS)


def test_lr_schedule_sets_optimizer_lr_per_step_and_round_trips():
    opt = build_optimizer(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), lr=0.0)
    schedule = LRSchedule(**KINETICS)
    assert schedule.step(opt, epoch=16, step=500, steps_per_epoch=1000) == pytest.approx(lr_at(16.5, **KINETICS))
    assert [g["lr"] for g in opt.param_groups] == [schedule.last_lr] * 2
    assert schedule.last_epoch == 16.5

    state = pickle.loads(pickle.dumps(schedule.state_dict()))
    resumed = LRSchedule(base_lr=1.0, warmup_epochs=0, total_epochs=1)
    resumed.load_state_dict(state)
    assert resumed == schedule
    assert resumed.step(opt, 100, 0, 10) == pytest.approx(lr_at(100, **KINETICS))
    with pytest.raises(ValueError, match="unknown keys"):
        resumed.load_state_dict({**state, "gamma": 0.1})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        schedule.step(opt, 0, 0, 0)


# --- metrics -------------------------------------------------------------------------------------------


def logits_of(*probs):
    """Logits whose softmax is exactly `probs` (one row per view)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def test_topk_correct_caps_k_at_the_class_count():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 4}


def test_video_level_averaged_softmax_beats_view_majority():
    # Two views lean weakly to class 1, one view is sure of class 0. Majority of view argmaxes: class 1.
    # Mean softmax: class 0 = (0.3 + 0.3 + 0.98) / 3 = 0.527 > class 1 = 0.27. The video is class 0.
    views = logits_of([0.3, 0.4, 0.3], [0.3, 0.4, 0.3], [0.98, 0.01, 0.01])
    assert views.argmax(1).tolist() == [1, 1, 0]
    agg = VideoAggregator()
    agg.add(["v"] * 3, [0, 0, 0], views)
    result = agg.results(3)
    assert result["top1"] == 1.0
    assert topk_correct(views, torch.zeros(3, dtype=torch.long), ks=(1,)) == {1: 1}  # views: 1 of 3
    _, _, probs = agg.video_scores()
    np.testing.assert_allclose(probs[0], [1.58 / 3, 0.81 / 3, 0.61 / 3])
    assert result["top5"] == 1.0  # top-5 of 3 classes: always right
    assert result["views_per_video"] == {"min": 3, "max": 3}


def known_views():
    """9 videos, 4 classes (class 3 has no videos), 2 views each; (video, label, view, logits) rows.

    true:      0 0 0 1 1 2 2 2 2
    predicted: 0 0 1 1 2 2 2 2 0
    """
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    rows = []
    for i, (t, p) in enumerate(zip(true, predicted, strict=True)):
        for view in range(2):
            logit = torch.zeros(4)
            logit[p] = 3.0 + view  # both views agree on p
            rows.append((f"vid{i}", t, view, logit))
    return rows


def aggregate(rows, batch=3):
    agg = VideoAggregator()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        agg.add(
            [r[0] for r in chunk],
            [r[1] for r in chunk],
            torch.stack([r[3] for r in chunk]),
            view_ids=[r[2] for r in chunk],
        )
    return agg


def test_confusion_matrix_and_per_class_accuracy_on_a_known_example():
    result = aggregate(known_views()).results(4, class_names=["a", "b", "c", "d"])
    assert result["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    assert result["num_videos"] == 9
    assert result["top1"] == pytest.approx(6 / 9)
    assert [c["accuracy"] for c in result["per_class"]] == pytest.approx([2 / 3, 1 / 2, 3 / 4, None])
    assert [c["videos"] for c in result["per_class"]] == [3, 2, 4, 0]
    assert result["per_class"][2] == {"index": 2, "name": "c", "videos": 4, "correct": 3, "accuracy": 0.75}
    # Classes without videos do not count in the mean (they would pull it to 0).
    assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert result["top5"] == 1.0  # 4 classes: top-5 covers them all
    assert result["views_per_video"] == {"min": 2, "max": 2}
    json.dumps(result)  # goes straight into run records and MLflow


def test_views_in_any_order_give_the_same_result():
    rows = known_views()
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert aggregate(shuffled, batch=4).results(4) == aggregate(rows, batch=3).results(4)


def test_merge_of_partial_aggregators_equals_one():
    rows = known_views()
    random.Random(1).shuffle(rows)
    whole = aggregate(rows)
    # Split so that most videos have one view on each worker.
    first, second = aggregate(rows[::2]), aggregate(rows[1::2])
    assert len(first) + len(second) > len(whole)
    merged = aggregate(rows[::2]).merge(second)
    assert merged.results(4) == whole.results(4)
    ids, labels, probs = merged.video_scores()
    ids_w, labels_w, probs_w = whole.video_scores()
    assert ids == ids_w and labels.tolist() == labels_w.tolist()
    np.testing.assert_allclose(probs, probs_w, rtol=1e-12)

    # The way workers send them: picklable state dicts, combined on the driver.
    states = [pickle.loads(pickle.dumps(a.state_dict())) for a in (first, second, VideoAggregator())]
    assert VideoAggregator.from_state_dicts(states).results(4) == whole.results(4)


def test_missing_and_repeated_views_are_visible():
    rows = known_views()
    agg = aggregate(rows[:-1])  # vid8 lost its second view
    assert agg.results(4)["views_per_video"] == {"min": 1, "max": 2}
    agg = aggregate(rows + rows[:2])  # a retried batch: vid0's views again
    assert agg.duplicate_views == 2
    assert agg.results(4) == {**aggregate(rows).results(4), "duplicate_views": 2}

    with pytest.raises(MetricsError, match=r"video 'vid0': views \[0\] were scored by both"):
        aggregate(rows[:1]).merge(aggregate(rows[:1]))


def test_conflicting_inputs_are_errors():
    agg = VideoAggregator()
    agg.add(["v"], [0], torch.zeros(1, 3))
    with pytest.raises(MetricsError, match="video 'v': one view says label 2, another said 0"):
        agg.add(["v"], [2], torch.zeros(1, 3))
    with pytest.raises(MetricsError, match="4 classes cannot join scores with 3"):
        agg.add(["w"], [0], torch.zeros(1, 4))
    with pytest.raises(MetricsError, match="3 classes, results asked for 5"):
        agg.results(5)
    with pytest.raises(MetricsError, match="batch lengths differ"):
        agg.add(["x", "y"], [0], torch.zeros(1, 3))
    with pytest.raises(MetricsError, match="no videos"):
        VideoAggregator().results(3)


# --- plots ---------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("num_classes", [4, 50])
def test_confusion_matrix_png(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    confusion = np.diag(rng.integers(5, 20, num_classes)) + rng.integers(0, 3, (num_classes, num_classes))
    names = [f"class_{i}" for i in range(num_classes)]
    path = confusion_matrix_png(confusion.tolist(), names, tmp_path / "confusion.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_learning_curve_png(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 * 0.8**e,
            "train_top1": 1 - 0.8**e,
            "lr": lr_at(e, base_lr=0.1, warmup_epochs=2, total_epochs=10),
        }
        for e in range(10)
    ]
    for record in history[1::2]:  # validation every other epoch
        record.update(
            val_loss=record["train_loss"] * 1.2,
            val_top1=record["train_top1"] * 0.9,
            val_top5=min(1.0, record["train_top1"] * 1.3),
        )
    path = learning_curve_png(history, tmp_path / "curve.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    with pytest.raises(ValueError, match="nothing to plot"):
        learning_curve_png([{"epoch": 0, "seconds": 12.0}], tmp_path / "empty.png")
