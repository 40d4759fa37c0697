"""Fine-tuning through the pipeline: train.init_from from a path, s3:// (the moto endpoint) and models:/ (a
real sqlite registry), checked in the driver before any worker starts; a 400-class checkpoint into the
4-class synthetic set keeps its backbone and the rows of shared classes; a real Ray Train run with frozen
stages leaves them as the checkpoint had them. A registered version is read from its weights-only checkpoint:
its pickled module, made to run a command, never runs."""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipelines import tracking, workflow
from pipelines.checkpoints import CHECKPOINT_FILE
from pipelines.data import storage_of
from pipelines.train import TrainError, check_init_from, initial_weights, prepare_data, train
from slowfast.model import SlowFast, load_checkpoint, save_checkpoint
from slowfast.serving import ClipSpec, VideoClassifier

from conftest import pipeline_config

HEAD = ("head.fc.weight", "head.fc.bias")
# How the registered versions here cut their clips (the config's model, 1 view).
SPEC = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=1, spatial_crops=1)


def synth_classes(videos: Path) -> list[str]:
    return sorted({row["label"] for row in csv.DictReader((videos / "annotations/train.csv").open())})


def kinetics_like(cfg, classes: list[str], path: Path) -> tuple[Path, list[str]]:
    """A '400-class' checkpoint of the config's architecture; two of the dataset's classes among its names."""
    torch.manual_seed(1)
    names = [f"k400_class_{i}" for i in range(400)]
    names[17], names[230] = classes[0], classes[2]
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=400))
    return save_checkpoint(net, path, class_names=names), names


def finetune_config(tmp: Path, videos: Path, **train_section):
    """1 epoch of 3 steps (12 train videos x 2 clips, 8 a step): enough to move the stages that train."""
    return pipeline_config(
        tmp,
        videos,
        preprocess={"clips_per_video": 2, "rows_per_shard": 8},
        train={
            "epochs": 1,
            "batch_size": 8,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "base_lr": 0.04,
            "warmup_epochs": 0.0,
            **train_section,
        },
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "ft", "model_name": "ft"},
        ray={"data_cpus": 1.0},
    )


@pytest.fixture(scope="module")
def prepared(ray_local, synth_set, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = finetune_config(tmp, synth_set)
    return tmp, prepare_data(cfg, storage_of(cfg), log=lambda *_: None)


def check_backbone_and_head(init: dict, checkpoint: Path, names: list[str], classes: list[str]) -> None:
    theirs = torch.load(checkpoint, weights_only=True)["model_state"]
    state = init["state"]
    backbone = [k for k in state if k not in HEAD]
    assert backbone and all(torch.equal(state[k], theirs[k]) for k in backbone)
    for row, name in enumerate(classes):
        kept = (
            torch.equal(state["head.fc.weight"][row], theirs["head.fc.weight"][names.index(name)])
            if name in names
            else False
        )
        assert kept == (name in names), name
    assert state["head.fc.weight"].shape[0] == len(classes)


def test_init_from_a_path_an_s3_uri_and_the_registry(prepared, synth_set, s3_endpoint):
    tmp, data = prepared
    classes = synth_classes(synth_set)
    assert data.classes == classes
    cfg = finetune_config(tmp, synth_set)
    checkpoint, names = kinetics_like(cfg, classes, tmp / "k400.pt")
    store = storage_of(cfg)
    lines: list[str] = []

    path_cfg = finetune_config(tmp, synth_set, init_from=str(checkpoint))
    from_path = initial_weights(path_cfg, data, store, lines.append)
    check_backbone_and_head(from_path, checkpoint, names, classes)
    # The workflow checks the file before ingest and hands what it read to the train step.
    checked = initial_weights(path_cfg, data, store, lines.append, check_init_from(path_cfg, store, lines.append))
    assert all(torch.equal(checked["state"][k], v) for k, v in from_path["state"].items())
    assert "re-initialised head.fc.weight, head.fc.bias" in lines[-1] and "2 shared classes" in lines[-1]
    assert from_path["tags"]["slowfast.init_kept_classes"] == f"{classes[0]}, {classes[2]}"
    assert from_path["tags"]["slowfast.init_format"] == "slowfast-pipeline"

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="weights")
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(checkpoint), "weights", "zoo/k400.pt")
    s3_cfg = finetune_config(tmp, synth_set, init_from="s3://weights/zoo/k400.pt")
    s3_cfg.s3.endpoint_url = s3_endpoint
    from_s3 = initial_weights(s3_cfg, data, storage_of(s3_cfg), lines.append)
    assert all(torch.equal(from_s3["state"][k], v) for k, v in from_path["state"].items())

    # A registered version (logged as the registry step logs one) of the 400-class network.
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=400))
    load_checkpoint(net, checkpoint)
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    version = tracking.log_model(cfg, run_id, net=net, class_names=names, spec=SPEC, metadata={})
    from_registry = initial_weights(
        finetune_config(tmp, synth_set, init_from=f"models:/ft/{version}"), data, store, lines.append
    )
    check_backbone_and_head(from_registry, checkpoint, names, classes)

    with pytest.raises(TrainError, match="train.init_from .*no checkpoint there"):
        initial_weights(finetune_config(tmp, synth_set, init_from=str(tmp / "missing.pt")), data, store, lines.append)
    with pytest.raises(TrainError, match="models:/ft/99"):
        initial_weights(finetune_config(tmp, synth_set, init_from="models:/ft/99"), data, store, lines.append)


class RunsACommand:
    """Unpickling this runs `touch marker`: a pickled module that would run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_version(cfg, net: SlowFast, names: list[str], marker: Path, *, checkpoint: bool = True) -> str:
    """A registered version whose pickled module (data/model.pth, what mlflow.pytorch.load_model unpickles) runs
    `touch marker`; checkpoint=False: also without tracking.CHECKPOINT, as versions logged before it were."""
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    version = tracking.log_model(cfg, run_id, net=net, class_names=names, spec=SPEC, metadata={})
    source = tracking.client(cfg).get_model_version(cfg.mlflow.model_name, version).source
    folder = Path(
        tracking.client(cfg).get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://")
    )
    torch.save(RunsACommand(marker), folder / "data" / "model.pth")
    if not checkpoint:
        (folder / tracking.CHECKPOINT).unlink()
        mlmodel = Model.load(folder)
        del mlmodel.flavors[tracking.FLAVOR_NAME]["checkpoint"]
        mlmodel.save(folder / "MLmodel")
    return version


def test_a_registered_version_is_read_weights_only_and_its_pickled_module_never_runs(prepared, synth_set):
    tmp, data = prepared
    cfg = finetune_config(tmp, synth_set)
    torch.manual_seed(3)
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(data.classes)))
    marker = tmp / "hostile-ran"
    version = hostile_version(cfg, net, data.classes, marker)
    uri = f"models:/ft/{version}"
    init_cfg = finetune_config(tmp, synth_set, init_from=uri)
    store = storage_of(init_cfg)
    lines: list[str] = []

    # train.init_from: checked before any step, then loaded; the weights are the version's, and nothing ran.
    init = initial_weights(init_cfg, data, store, lines.append, check_init_from(init_cfg, store, lines.append))
    assert all(torch.equal(init["state"][k], v) for k, v in net.state_dict().items())
    assert init["tags"]["slowfast.init_format"] == "slowfast-pipeline"
    # The pyfunc (`mlflow models serve`) and load_registered (predict, infer, evaluate, export) read the same.
    video = next((synth_set / "val").rglob("*.mp4")).read_bytes()
    with tracking.use_tracking(cfg):
        served = mlflow.pyfunc.load_model(uri).predict([video], params={"top_k": 2})
    registered = tracking.load_registered(cfg, uri)
    want = VideoClassifier(net, data.classes, SPEC).predict([video], top_k=2)[0]
    assert list(served["labels"][0]) == want["labels"] and list(served["scores"][0]) == want["scores"]
    assert all(torch.equal(registered.model.state_dict()[k], v) for k, v in net.state_dict().items())
    assert not marker.exists()
    # The file is a real threat: MLflow's PyTorch flavor unpickles it and runs the command.
    with tracking.use_tracking(cfg), contextlib.suppress(Exception):
        mlflow.pytorch.load_model(uri)
    assert marker.exists()


def test_a_version_logged_without_its_checkpoint_is_refused_with_what_to_use_instead(prepared, synth_set):
    tmp, data = prepared
    cfg = finetune_config(tmp, synth_set)
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(data.classes)))
    marker = tmp / "old-version-ran"
    version = hostile_version(cfg, net, data.classes, marker, checkpoint=False)
    tracking.client(cfg).set_model_version_tag("ft", version, "slowfast.checkpoint", "/runs/x/epoch-0003")
    init_cfg = finetune_config(tmp, synth_set, init_from=f"models:/ft/{version}")
    with pytest.raises(TrainError) as err:
        check_init_from(init_cfg, storage_of(init_cfg), lambda *_: None)
    message = str(err.value)
    assert "\n" not in message
    assert f"models:/ft/{version}: logged without {tracking.CHECKPOINT}" in message
    assert "never unpickles" in message and "instead, /runs/x/epoch-0003 (its tag slowfast.checkpoint)" in message
    assert not marker.exists()


def test_a_checkpoint_of_another_architecture_stops_before_any_worker_starts(prepared, synth_set):
    tmp, _ = prepared
    other = finetune_config(tmp, synth_set)
    slow_only = SlowFast(other.model.to_slowfast_config(num_classes=400, arch="slow"))
    path = save_checkpoint(slow_only, tmp / "slow_only.pt")
    cfg = finetune_config(tmp, synth_set, init_from=str(path))
    with pytest.raises(TrainError, match="does not fit the model"):
        train(cfg, log=lambda *_: None)
    assert not (tmp / "storage" / "checkpoints").exists()  # no run was started


def test_the_workflow_refuses_a_checkpoint_that_does_not_fit_before_ingest(synth_set, tmp_path):
    other = finetune_config(tmp_path, synth_set)
    path = save_checkpoint(SlowFast(other.model.to_slowfast_config(num_classes=400, arch="slow")), tmp_path / "s.pt")
    cfg = finetune_config(tmp_path, synth_set, init_from=str(path))
    with pytest.raises(TrainError, match="does not fit the model"):
        workflow.run(cfg, log=lambda *_: None)
    storage = tmp_path / "storage"
    assert sorted(p.name for p in storage.iterdir()) == ["runs"]  # nothing listed, decoded or trained
    (record,) = workflow.list_runs(cfg)
    assert record["status"] == "failed"
    missing = finetune_config(tmp_path, synth_set, init_from=str(tmp_path / "nothing.pkl"))
    with pytest.raises(TrainError, match="nothing.pkl"):
        workflow.run(missing, log=lambda *_: None)


def test_fine_tune_with_frozen_stages_through_ray_train(prepared, synth_set):
    tmp, _ = prepared
    cfg0 = finetune_config(tmp, synth_set)
    checkpoint, _ = kinetics_like(cfg0, synth_classes(synth_set), tmp / "k400-run.pt")
    cfg = finetune_config(
        tmp, synth_set, init_from=str(checkpoint), freeze_up_to="res3", freeze_bn=True, head_lr_mult=10.0
    )
    out = train(cfg, log=lambda *_: None)
    assert out["epochs_done"] == 1
    trained = torch.load(Path(out["best_checkpoint"]) / CHECKPOINT_FILE, weights_only=True)["model_state"]
    start = torch.load(checkpoint, weights_only=True)["model_state"]
    frozen = [k for k in trained if k.startswith(("slow.stem", "fast.stem", "slow.res2", "fast.res3", "lateral.res2"))]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    # Frozen batch norm everywhere: statistics as the checkpoint had them, also in the stages that train.
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], start[k]) for k in stats)
    moved = [k for k in trained if k.startswith("slow.res5") and k.endswith("conv.weight")]
    assert moved and any(not torch.equal(trained[k], start[k]) for k in moved)
    tags = MlflowClient(out["tracking_uri"]).get_run(out["mlflow_run_id"]).data.tags
    assert tags["slowfast.init_from"] == str(checkpoint) and tags["slowfast.init_reinitialised"] == ", ".join(HEAD)
