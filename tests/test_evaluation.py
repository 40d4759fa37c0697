"""One evaluation path: the training run's validation, `pipelines evaluate` and the ablation study score the
same checkpoint on the same views into the same video-level figures, and all pick N of the stored views
with the one uniform rule. Real shards from real videos (local Ray preprocess)."""

from __future__ import annotations

import pytest
import torch

from pipelines.data import storage_of
from pipelines.evaluate import eval_set, score, score_on_ray
from pipelines.train import prepare_data
from pipelines.train_loop import LoopConfig, Worker, validate
from slowfast.model import SlowFast
from slowfast.shards.reader import iter_clips
from slowfast.train import memory_format
from slowfast.train.evaluation import score_views
from slowfast.video.sampling import choose_views

from conftest import load_benchmark, pipeline_config

STORED, WANTED = 5, 3  # N < stored views: choose_views(5, 3) = [0, 2, 4]


@pytest.fixture(scope="module")
def prepared(ray_local, synth_set, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    cfg = pipeline_config(
        tmp, synth_set, preprocess={"eval_views": STORED}, evaluate={"temporal_views": WANTED, "spatial_crops": 1}
    )
    store = storage_of(cfg)
    data = prepare_data(cfg, store, log=lambda *_: None)
    torch.manual_seed(0)
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(data.classes)))
    # A network that tells videos apart: random weights with a stronger classifier, so the figures and the
    # confusion matrix depend on every view's scores.
    with torch.no_grad():
        net.head.fc.weight.mul_(50)
    return cfg, store, data, net.eval()


@pytest.fixture
def ablation(monkeypatch):
    return load_benchmark("ablate", monkeypatch)


def test_choose_views_is_uniform_over_the_stored_views():
    assert choose_views(5, 3) == [0, 2, 4]
    assert choose_views(10, 10) == list(range(10)) and choose_views(3, 7) == [0, 1, 2]
    assert choose_views(10, 1) == [0] and choose_views(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    with pytest.raises(ValueError, match="must be >= 1"):
        choose_views(0, 3)


def test_validation_evaluate_and_ablation_give_the_same_figures(prepared, ablation):
    cfg, store, data, net = prepared
    fmt = memory_format("cpu")

    es = eval_set(cfg, store, log=lambda *_: None)
    assert es.clip_indices == [0, 2, 4]
    evaluated = score(net, es, store, batch_size=4, device="cpu")

    loop = LoopConfig(
        cfg=cfg,
        store=store,
        classes=data.classes,
        val_shards=[(store.path(p), sorted(s)) for p, s in data.val_shards],
        val_views=choose_views(STORED, WANTED),
        train_clips=1,
        tracking_uri="",
        mlflow_run_id="",
        run_name="test",
    )
    worker = Worker(
        rank=0,
        world=1,
        device=torch.device("cpu"),
        fmt=fmt,
        net=net,
        model=net,
        optimizer=None,
        schedule=None,
        tracker=None,
        steps_per_epoch=1,
    )
    validated = validate(worker, loop)

    batches = ablation.eval_batches(cfg, data)
    ablated = ablation.score_val(net, batches, len(data.classes))

    assert evaluated["num_videos"] == validated["val_videos"] == ablated["val_videos"] == 4
    assert evaluated["views_per_video"] == {"min": WANTED, "max": WANTED}
    assert evaluated["top1"] == validated["val_top1"] == ablated["top1"]
    assert evaluated["top5"] == validated["val_top5"] == ablated["top5"]
    assert evaluated["mean_class_accuracy"] == validated["val_mean_class_accuracy"] == ablated["mean_class_accuracy"]

    # The same views, scored the same: per-video mean probabilities agree, and only views 0, 2 and 4 (centre
    # crop: spatial position 1 of 3) were read.
    shards = [(store.path(p), s) for p, s in data.val_shards]
    direct = score_views(
        net,
        iter_clips(
            shards,
            mode="eval",
            batch_size=4,
            crop=cfg.train.crop_size,
            filesystem=store.fs,
            spatial_crops=1,
            views=choose_views(STORED, WANTED),
        ),
        device="cpu",
        fmt=fmt,
    )
    assert {tuple(v) for v in direct.videos.state_dict()["view_ids"]} == {(1, 7, 13)}
    again = score_views(net, batches, device="cpu", fmt=fmt)
    _, _, p1 = direct.videos.video_scores()
    _, _, p2 = again.videos.video_scores()
    assert torch.allclose(torch.from_numpy(p1), torch.from_numpy(p2), atol=1e-6)


@pytest.mark.parametrize("spatial_crops", [1, 3])
def test_evaluation_on_ray_data_gives_the_driver_side_figures(prepared, spatial_crops):
    """The workflow's evaluate scores on the cluster (decode tasks, an actor pool); the driver-side loop it
    replaced gives the same figures on the same network and views."""
    cfg, store, _, net = prepared
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"spatial_crops": spatial_crops})})
    es = eval_set(cfg, store, log=lambda *_: None)
    assert len(es.shards) > 1  # several decode tasks, merged
    local = score(net, es, store, batch_size=4, device="cpu")
    on_ray = score_on_ray(cfg, net, es, store)
    for key in ("top1", "top5", "mean_class_accuracy", "num_videos", "views_per_video", "confusion", "per_class"):
        assert on_ray[key] == local[key], key
    assert on_ray["views_per_video"] == {"min": WANTED * spatial_crops, "max": WANTED * spatial_crops}
