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


def write_config(tmp_path, synth_set, s3, server, name: str, train: dict, ray: dict, folder: str = "synth",
                 preprocess: dict | None = None):
    """A small workflow over the videos in s3://VIDEOS/FOLDER, storage_root in S3, MLflow on the server; returns
    its path."""
    cfg = pipeline_config(
        tmp_path, synth_set, name=name, storage_root=f"s3://{STORAGE}/{name}", s3={"endpoint_url": s3},
        data={"video_root": f"s3://{VIDEOS}/{folder}",
              "annotations": {split: f"s3://{VIDEOS}/{folder}/annotations/{split}.csv" for split in ("train", "val")}},
        # 8 clips a video: epochs of 12 steps (2 workers) or 24 (1), long enough for a kill to land inside one.
        preprocess=preprocess or {"clips_per_video": 8, "rows_per_shard": 16},
        train={"batch_size": 4, "cpus_per_worker": 1, "warmup_epochs": 0.5, "base_lr": 0.04, "max_failures": 3,
               **train},
        mlflow={"tracking_uri": server["url"], "experiment": name, "model_name": name},
        ray={"data_cpus": 1.0, **ray}, infer={"cpus_per_worker": 1, "decode_cpus": 1})
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def run(config) -> tuple[str, ...]:
    return ("python", "-m", "pipelines", "run", "--config", str(config))


def wait_for_checkpoint(s3: str, name: str, epoch: int, cluster: LocalCluster, submission: str,
                        timeout: float = 600) -> None:
    """Until Ray Train lists the run's checkpoint of `epoch` in its snapshot (written once the checkpoint is
    whole): the next epoch is then under way."""
    client = boto3.client("s3", endpoint_url=s3)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for _ in range(10):
            keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=STORAGE, Prefix=f"{name}/checkpoints/") for o in page.get("Contents", [])]
            for key in keys:
                if key.endswith("checkpoint_manager_snapshot.json") and f"epoch-{epoch:04d}" in \
                        client.get_object(Bucket=STORAGE, Key=key)["Body"].read().decode():
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


def test_roles_and_elastic_training_through_job_submit_with_a_train_node_killed_mid_epoch(cluster, s3, server,
                                                                                        synth_set, tmp_path):
    cluster.add_nodes(("data1", 1, "data"), ("train1", 1, "train"), ("train2", 1, "train"))
    config = write_config(tmp_path, synth_set, s3, server, "elastic",
                          train={"epochs": 3, "num_workers": [1, 2], "resources_per_worker": TRAIN_SLOT},
                          ray={"train_nodes": TRAIN_ROLE, "data_nodes": DATA_ROLE})

    # A local storage_root on a cluster of several nodes: refused before anything is written.
    local = tmp_path / "local-storage"
    status, log = cluster.wait(cluster.submit(*run(config), "--set", f"storage_root={local}"), timeout=300)
    assert status == "FAILED"
    assert f"storage_root '{local}': a local path, and this Ray cluster has 4 nodes" in log
    assert "--set storage_root=s3://BUCKET/PREFIX" in log and "--set shared_filesystem=true" in log
    assert "Traceback" not in log and not local.exists()

    submission = cluster.submit(*run(config))
    wait_for_checkpoint(s3, "elastic", 1, cluster, submission)
    cluster.kill("train2")  # kill -9 of a train node's raylet and workers, in epoch 2
    status, log = cluster.wait(submission)
    assert status == "SUCCEEDED", log[-4000:]
    assert "on 1 to 2 workers (elastic" in log and "models:/elastic/1" in log
    resumed = re.search(r"resuming after epoch ([12]) on 1 worker\(s\), the checkpoint was written by 2: global "
                        r"batch 8 -> 4, LR ([0-9.e-]+) -> ([0-9.e-]+)", log)
    assert resumed, log[-4000:]
    assert float(resumed.group(3)) == pytest.approx(float(resumed.group(2)) / 2, rel=1e-3)
    # Each epoch recorded once (none repeated): those before the loss on 2 workers, the rest on 1, with the batch
    # and the learning rate following them.
    before = int(resumed.group(1))
    assert epoch_metric(server, "elastic", "workers") == [(e, 2 if e <= before else 1) for e in (1, 2, 3)]
    assert epoch_metric(server, "elastic", "global_batch") == [(e, 8 if e <= before else 4) for e in (1, 2, 3)]
    lrs = dict(epoch_metric(server, "elastic", "base_lr"))
    assert lrs[3] == pytest.approx(lrs[1] / 2)
    assert [v.version for v in registered_versions(server, "elastic")] == ["1"]

    # Where each kind of work ran, from Ray's state API (the killed node's records included).
    ids = cluster.node_ids(alive=False)
    train_nodes, data_nodes = {ids["train1"], ids["train2"]}, {ids["data1"]}
    actors, tasks = cluster.state("actors"), cluster.state("tasks")
    assert where(actors, r"^RayTrainWorker$") == train_nodes  # one worker on each, then one on train1
    assert where(actors, r"ScoreViews") == {ids["train1"]}  # evaluate's scoring actors
    assert where(actors, r"ClipWriter") == data_nodes  # preprocess
    for work in ("shuffled_files", "read_shards", "train_clips", "read_views"):
        assert where(tasks, work) == data_nodes, work
    assert not (where(actors, DATA_WORK) | where(tasks, DATA_WORK)) & train_nodes


def test_a_survivor_holding_every_cpu_stops_with_a_clear_error_then_resumes_when_a_node_joins(
        cluster, s3, server, synth_set, tmp_path):
    # No roles: two 1-CPU nodes, one for the train worker and one for Ray Data.
    cluster.add_nodes(("n1", 1, None), ("n2", 1, None))
    config = write_config(tmp_path, synth_set, s3, server, "starved", train={"epochs": 3, "num_workers": 1},
                          ray={"data_wait_timeout_s": 20})
    submission = cluster.submit(*run(config))
    names = {v: k for k, v in cluster.node_ids().items()}
    deadline = time.time() + 600
    while not (holder := where(cluster.state("actors", "state=ALIVE"), r"^RayTrainWorker$")):
        assert time.time() < deadline and not cluster.ended(submission), cluster.logs(submission)[-4000:]
        time.sleep(2)
    assert len(holder) == 1
    wait_for_checkpoint(s3, "starved", 1, cluster, submission)
    cluster.kill(names[holder.pop()])  # Ray Train restarts the worker on the survivor, which then has no CPU left

    status, log = cluster.wait(submission, timeout=600)
    assert status == "FAILED"
    # The driver's own last word, without a traceback of its own (Ray's controller logs the node's loss).
    said = [line for line in log.splitlines() if "Ray Data made no progress for 20 s" in line and
            line.startswith("pipelines run: train starved-")]
    assert len(said) == 1, log[-4000:]
    assert re.search(r"stopped after epoch [12] of 3\. Ray Data made no progress for 20 s \(ray.data_wait_timeout_s\): "
                     r"the training input's read and crop tasks wait for CPUs; the cluster has 2 node\(s\) with 1 "
                     r"CPU\(s\) in all, the train workers held 1 of them\. Add a node", said[0]), said[0]
    assert said[0].endswith("then run the same command again: it resumes where it stopped.")
    assert 'File "<frozen runpy>"' not in log

    cluster.add_nodes(("n3", 1, None))
    status, log = cluster.wait(cluster.submit(*run(config)))
    assert status == "SUCCEEDED", log[-4000:]
    assert re.search(r"resuming after epoch [12] ", log), log[-4000:]  # the kill may land after epoch 2's end
    assert [step for step, _ in epoch_metric(server, "starved", "train_loss")] == [1, 2, 3]
    assert [v.version for v in registered_versions(server, "starved")] == ["1"]


@pytest.fixture(scope="module")
def long_set(s3, tmp_path_factory):
    """Videos that keep preprocess busy for a while on one CPU (4 classes x 24, 320x240, 4 s: 72 to train on),
    in the bucket."""
    from slowfast.video.synth import write_dataset

    out = tmp_path_factory.mktemp("long-set")
    write_dataset(out, classes=4, videos_per_class=24, seed=11, width=320, height=240, seconds=4.0)
    client = boto3.client("s3", endpoint_url=s3)
    for path in out.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), VIDEOS, f"long/{path.relative_to(out).as_posix()}")
    return out


def test_preprocess_started_on_no_data_node_loses_it_mid_run_and_finishes_on_one_that_joins_exactly_once(
        cluster, s3, server, long_set, tmp_path):
    name = "decode"
    # One video per actor call (8 clips at full size: about a second each) and a commit after each shard.
    config = write_config(tmp_path, long_set, s3, server, name, train={"num_workers": 1},
                          ray={"data_nodes": DATA_ROLE}, folder="long",
                          preprocess={"clips_per_video": 8, "rows_per_shard": 8, "commit_every": 1,
                                      "short_side": 240})
    store = Storage(f"s3://{STORAGE}/{name}", S3Options(s3))
    # Started on a cluster with no data node (an autoscaler's data group at zero): the work waits for one.
    submission = cluster.submit("python", "-m", "pipelines", "preprocess", "--config", str(config), "--split",
                                "train")
    cluster.add_nodes(("data1", 1, "data"))
    deadline = time.time() + 600
    while not store.list("manifests/synth/train", suffix=".json"):
        assert time.time() < deadline and not cluster.ended(submission), cluster.logs(submission)[-4000:]
        time.sleep(1)

    # The data node dies with an actor mid-video; the run waits for another, which joins and finishes it.
    ids = cluster.node_ids()
    assert not cluster.ended(submission), "preprocess ended before the node loss: give it more videos"
    cluster.kill("data1")
    cluster.add_nodes(("data2", 1, "data"))
    ids.update(cluster.node_ids())
    status, log = cluster.wait(submission)
    if status != "SUCCEEDED":  # what the lost node was decoding may stop the run: the same command finishes it
        status, log = cluster.wait(cluster.submit("python", "-m", "pipelines", "preprocess", "--config", str(config),
                                                  "--split", "train"))
    assert status == "SUCCEEDED", log[-4000:]
    # data1 decoded the first commits alone; the pool went on on data2, which joined after data1 was gone.
    assert ids["data2"] in where(cluster.state("actors"), "ClipWriter")

    # Exactly once: every annotated video committed once, and its clips in exactly one committed shard.
    folders = {posixpath.dirname(p) for p in store.list("manifests/synth/train", suffix=".json")}
    assert len(folders) == 1
    commits = manifest.load_commits(store, folders.pop())
    records = Counter(v.video_id for c in commits for v in c.videos)
    with open(long_set / "annotations" / "train.csv") as f:
        annotated = list(csv.DictReader(f))
    assert len(records) == len(annotated) == 72
    assert set(records.values()) == {1}, [v for v, n in records.items() if n > 1]
    rows = Counter()
    for shard in {s["path"] for c in commits for s in c.shards}:
        with store.fs.open_input_file(store.path(shard)) as f:
            rows.update(pq.read_table(f, columns=["video_id"]).column("video_id").to_pylist())
    processed = {v.video_id for c in commits for v in c.videos if not v.quarantined}
    assert len(processed) == len(annotated) and all(rows[v] == 8 for v in processed) and set(rows) == processed
