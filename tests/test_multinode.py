"""The pipeline on a real multi-node Ray cluster on 127.0.0.1 (tests/multinode.py: a 0-CPU head and nodes with
roles, each its own raylet), storage on the moto S3 endpoint, MLflow on a real `mlflow server`; every run goes in
with `ray job submit`. What only several nodes expose: where each kind of work runs (Ray's state API), a local
storage_root refused, a whole node killed (kill -9 of its raylet and workers) during training and during
preprocessing, elastic training, a cluster left with no CPU for Ray Data, and a node that joins mid-run.

Run them alone with `pytest -m multinode`; `make test` runs them too."""
from __future__ import annotations

import csv
import posixpath
import re
import time
from collections import Counter

import boto3
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_server_in, pipeline_config
from multinode import TRAIN_SLOT, LocalCluster, where
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
        for _ in range(10):
            keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=STORAGE, Prefix=f"{name}/checkpoints/") for o in page.get("Contents", [])]
            if any(f"/epoch-{epoch:04d}/" in k for k in keys):
                return
            time.sleep(1)
        assert not cluster.ended(submission), cluster.logs(submission)[-4000:]
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


def test_elastic_training_loses_a_train_node_mid_epoch_and_finishes_on_the_other(cluster, s3, server, synth_set,
                                                                                 tmp_path):
    cluster.add_nodes(("data1", 1, "data"), ("train1", 1, "train"), ("train2", 1, "train"))
    config = write_config(tmp_path, synth_set, s3, server, "elastic",
                          train={"epochs": 3, "num_workers": [1, 2], "resources_per_worker": TRAIN_SLOT},
                          ray={"train_nodes": TRAIN_ROLE, "data_nodes": DATA_ROLE})
    submission = cluster.submit(*run(config))
    wait_for_checkpoint(s3, "elastic", 1, cluster, submission)
    cluster.kill("train2")  # kill -9 of a train node's raylet and workers, in epoch 2

    status, log = cluster.wait(submission)
    assert status == "SUCCEEDED", log[-4000:]
    assert "on 1 to 2 workers (elastic" in log
    resumed = re.search(r"resuming after epoch (\d) on 1 worker\(s\), the checkpoint was written by 2: global batch "
                        r"8 -> 4, LR ([0-9.e-]+) -> ([0-9.e-]+)", log)
    assert resumed, log[-4000:]
    assert float(resumed.group(3)) == pytest.approx(float(resumed.group(2)) / 2, rel=1e-3)
    # Every epoch recorded once (none repeated), the first on 2 workers and the last on 1, with the batch and
    # the learning rate following them.
    workers = epoch_metric(server, "elastic", "workers")
    assert [step for step, _ in workers] == [1, 2, 3]
    assert workers[0][1] == 2 and workers[-1][1] == 1
    batches = dict(epoch_metric(server, "elastic", "global_batch"))
    lrs = dict(epoch_metric(server, "elastic", "base_lr"))
    assert batches[1] == 8 and batches[3] == 4 and lrs[3] == pytest.approx(lrs[1] / 2)
    assert [v.version for v in registered_versions(server, "elastic")] == ["1"]


def test_a_survivor_holding_every_cpu_stops_with_a_clear_error_then_resumes_when_a_node_joins(
        cluster, s3, server, synth_set, tmp_path):
    # No roles: two 1-CPU nodes, one for the train worker and one for Ray Data.
    cluster.add_nodes(("n1", 1, None), ("n2", 1, None))
    config = write_config(tmp_path, synth_set, s3, server, "starved", train={"epochs": 3, "num_workers": 1},
                          ray={"data_wait_timeout_s": 20})
    submission = cluster.submit(*run(config))
    wait_for_checkpoint(s3, "starved", 1, cluster, submission)
    ids = {v: k for k, v in cluster.node_ids().items()}
    holder = where(cluster.state("actors", "state=ALIVE"), r"^RayTrainWorker$")
    assert len(holder) == 1
    cluster.kill(ids[holder.pop()])  # Ray Train restarts the worker on the survivor, which then has no CPU left

    status, log = cluster.wait(submission, timeout=600)
    assert status == "FAILED"
    assert "Ray Data made no progress for 20 s (ray.data_wait_timeout_s): the training input's read and crop " \
           "tasks wait for CPUs" in log, log[-4000:]
    assert "run the same command again: it resumes where it stopped" in log and "Traceback" not in log

    cluster.add_nodes(("n3", 1, None))
    status, log = cluster.wait(cluster.submit(*run(config)))
    assert status == "SUCCEEDED", log[-4000:]
    assert re.search(r"resuming after epoch [12]", log), log[-4000:]
    assert [step for step, _ in epoch_metric(server, "starved", "train_loss")] == [1, 2, 3]
    assert [v.version for v in registered_versions(server, "starved")] == ["1"]


@pytest.fixture(scope="module")
def long_set(s3, tmp_path_factory):
    """Videos that keep preprocess busy for a while on one CPU (4 classes x 12, 320x240, 4 s), in the bucket."""
    from slowfast.video.synth import write_dataset

    out = tmp_path_factory.mktemp("long-set")
    write_dataset(out, classes=4, videos_per_class=12, seed=11, width=320, height=240, seconds=4.0)
    client = boto3.client("s3", endpoint_url=s3)
    for path in out.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), VIDEOS, f"long/{path.relative_to(out).as_posix()}")
    return out


def test_preprocess_grows_onto_a_data_node_that_joins_and_survives_losing_one_exactly_once(
        cluster, s3, server, long_set, tmp_path):
    cluster.add_nodes(("data1", 1, "data"))
    name = "decode"
    # One video per actor call and a commit after each shard, so that the work is spread in small pieces.
    config = write_config(tmp_path, long_set, s3, server, name, train={"num_workers": 1},
                          ray={"data_nodes": DATA_ROLE},
                          data={"video_root": f"s3://{VIDEOS}/long",
                                "annotations": {"train": f"s3://{VIDEOS}/long/annotations/train.csv",
                                                "val": f"s3://{VIDEOS}/long/annotations/val.csv"}},
                          preprocess={"clips_per_video": 2, "rows_per_shard": 2, "commit_every": 1})
    store = Storage(f"s3://{STORAGE}/{name}", S3Options(s3))
    submission = cluster.submit("python", "-m", "pipelines", "preprocess", "--config", str(config), "--split",
                                "train")
    deadline = time.time() + 600
    while not store.list("manifests/synth/train", suffix=".json"):
        assert time.time() < deadline and not cluster.ended(submission), cluster.logs(submission)[-4000:]
        time.sleep(1)

    # A data node joins while preprocess runs: the actor pool grows onto it.
    cluster.add_nodes(("data2", 1, "data"))
    joined = cluster.node_ids()["data2"]
    while joined not in where(cluster.state("actors", "state=ALIVE"), "ClipWriter"):
        assert time.time() < deadline and not cluster.ended(submission), (
            "no decode actor started on the node that joined", cluster.logs(submission)[-4000:])
        time.sleep(2)
    # Then the first data node dies, with an actor mid-video.
    cluster.kill("data1")
    status, log = cluster.wait(submission)
    if status != "SUCCEEDED":  # what the lost node was decoding may stop the run: the same command finishes it
        status, log = cluster.wait(cluster.submit("python", "-m", "pipelines", "preprocess", "--config", str(config),
                                                  "--split", "train"))
    assert status == "SUCCEEDED", log[-4000:]

    # Exactly once: every annotated video committed once, and its clips in exactly one committed shard.
    folders = {posixpath.dirname(p) for p in store.list("manifests/synth/train", suffix=".json")}
    assert len(folders) == 1
    commits = manifest.load_commits(store, folders.pop())
    records = Counter(v.video_id for c in commits for v in c.videos)
    with open(long_set / "annotations" / "train.csv") as f:
        annotated = list(csv.DictReader(f))
    assert len(records) == len(annotated) == 36
    assert set(records.values()) == {1}, [v for v, n in records.items() if n > 1]
    rows = Counter()
    for shard in {s["path"] for c in commits for s in c.shards}:
        with store.fs.open_input_file(store.path(shard)) as f:
            rows.update(pq.read_table(f, columns=["video_id"]).column("video_id").to_pylist())
    processed = {v.video_id for c in commits for v in c.videos if not v.quarantined}
    assert len(processed) == len(annotated) and all(rows[v] == 2 for v in processed) and set(rows) == processed
