"""The pipeline on a real multi-node Ray cluster on 127.0.0.1 (tests/multinode.py: a 0-CPU head and nodes with
roles, each its own raylet), storage on the moto S3 endpoint, MLflow on a real `mlflow server`; every run goes in
with `ray job submit`. What only several nodes expose: where each kind of work runs (Ray's state API), a local
storage_root refused, a whole node killed (kill -9 of its raylet and workers) during training and during
preprocessing, elastic training, a cluster left with no CPU for Ray Data, and a node that joins mid-run.

Run them alone with `pytest -m multinode`; `make test` runs them too."""
from __future__ import annotations

import json
import re
import time

import boto3
import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_server_in, pipeline_config
from multinode import LocalCluster, where
from slowfast.shards import manifest
from pipelines.storage import S3Options, Storage

pytestmark = pytest.mark.multinode

VIDEOS, STORAGE, MLFLOW = "mn-videos", "mn-storage", "mn-mlflow"
TRAIN_ROLE, DATA_ROLE = {"node-role": "train"}, {"node-role": "data"}
# Ray Data's work, by task or actor name: the training input, evaluate's view reader, preprocess's actors.
DATA_WORK = r"shuffled_files|read_shards|train_clips|read_views|ClipWriter"


@pytest.fixture(scope="module")
def s3(s3_endpoint, synth_set):
    """The synthetic set in a bucket (the nodes share nothing else), and a bucket for storage_root."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in (VIDEOS, STORAGE):
        client.create_bucket(Bucket=bucket)
    for path in synth_set.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), VIDEOS, f"synth/{path.relative_to(synth_set).as_posix()}")
    return s3_endpoint


@pytest.fixture(scope="module")
def server(s3_endpoint, tmp_path_factory):
    yield from mlflow_server_in(s3_endpoint, tmp_path_factory, MLFLOW)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster")
    yield c
    c.stop()


def write_config(tmp_path, synth_set, s3, server, name: str, train: dict, ray: dict, **sections):
    """A small workflow over the videos in S3, storage_root in S3, MLflow on the server; returns its path."""
    cfg = pipeline_config(
        tmp_path, synth_set, name=name, storage_root=f"s3://{STORAGE}/{name}", s3={"endpoint_url": s3},
        data={"video_root": f"s3://{VIDEOS}/synth", "annotations": {"train": f"s3://{VIDEOS}/synth/annotations/train.csv",
                                                                     "val": f"s3://{VIDEOS}/synth/annotations/val.csv"}},
        preprocess={"clips_per_video": 2, "rows_per_shard": 4},
        train={"batch_size": 4, "cpus_per_worker": 1, "warmup_epochs": 0.5, "base_lr": 0.04, "max_failures": 3,
               **train},
        mlflow={"tracking_uri": server["url"], "experiment": name, "model_name": name},
        ray={"data_cpus": 1.0, **ray}, infer={"cpus_per_worker": 1, "decode_cpus": 1}, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def run(config) -> tuple[str, ...]:
    return ("python", "-m", "pipelines", "run", "--config", str(config))


def wait_for_checkpoint(s3: str, name: str, epoch: int, cluster: LocalCluster, submission: str,
                        timeout: float = 600) -> None:
    """Until the run's checkpoint of `epoch` is in the bucket (the next epoch is then under way)."""
    client = boto3.client("s3", endpoint_url=s3)
    deadline = time.time() + timeout
    while time.time() < deadline:
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=STORAGE, Prefix=f"{name}/checkpoints/") for o in page.get("Contents", [])]
        if any(f"/epoch-{epoch:04d}/" in k for k in keys):
            return
        time.sleep(1)
    raise AssertionError(f"no checkpoint of epoch {epoch} after {timeout}s:\n{cluster.logs(submission)[-4000:]}")


def epoch_metric(server, name: str, key: str) -> list[tuple[int, float]]:
    """(epoch, value) of a per-epoch metric of the pipeline's one training run."""
    client = MlflowClient(server["url"])
    experiment = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "val_top1" in r.data.metrics]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))


def registered_versions(server, name: str) -> list:
    return MlflowClient(server["url"]).search_model_versions(f"name='{name}'")


def test_job_submit_puts_training_on_train_nodes_and_decoding_on_data_nodes(cluster, s3, server, synth_set,
                                                                             tmp_path):
    cluster.add_nodes(("data1", 1, "data"), ("train1", 1, "train"), ("train2", 1, "train"))
    config = write_config(tmp_path, synth_set, s3, server, "roles", train={"epochs": 2, "num_workers": 2},
                          ray={"train_nodes": TRAIN_ROLE, "data_nodes": DATA_ROLE})

    # A local storage_root on a cluster of several nodes: refused before anything is written.
    local = tmp_path / "local-storage"
    status, log = cluster.wait(cluster.submit(*run(config), "--set", f"storage_root={local}"), timeout=300)
    assert status == "FAILED"
    assert f"storage_root '{local}': a local path, and this Ray cluster has 4 nodes" in log
    assert "--set storage_root=s3://BUCKET/PREFIX" in log and "--set shared_filesystem=true" in log
    assert "Traceback" not in log and not local.exists()

    status, log = cluster.wait(cluster.submit(*run(config)))
    assert status == "SUCCEEDED", log[-4000:]
    assert "models:/roles/1" in log
    assert [v.version for v in registered_versions(server, "roles")] == ["1"]

    # Where each kind of work ran, from Ray's state API.
    ids = cluster.node_ids()
    train_nodes, data_nodes = {ids["train1"], ids["train2"]}, {ids["data1"]}
    actors, tasks = cluster.state("actors"), cluster.state("tasks")
    assert where(actors, r"^RayTrainWorker$") == train_nodes  # one worker on each
    assert where(actors, r"ScoreViews") and where(actors, r"ScoreViews") <= train_nodes  # evaluate's scoring
    assert where(actors, r"ClipWriter") == data_nodes  # preprocess
    for work in ("shuffled_files", "read_shards", "train_clips", "read_views"):
        assert where(tasks, work) == data_nodes, work
    assert not (where(actors, DATA_WORK) | where(tasks, DATA_WORK)) & train_nodes
