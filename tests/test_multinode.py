"""The pipeline on a real multi-node Ray cluster on 127.0.0.1 (tests/multinode.py: a 0-CPU head and nodes with
roles, each its own raylet), storage on the moto S3 endpoint, MLflow on a real `mlflow server`; every run goes in
with `ray job submit`. What only several nodes expose: where each kind of work runs (Ray's state API), a local
storage_root refused, a whole node killed (kill -9 of its raylet and workers) during training and during
preprocessing, elastic training, a cluster left with no CPU for Ray Data, and nodes that join mid-run.

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

from pipelines.storage import S3Options, Storage
from slowfast.shards import manifest

from conftest import mlflow_server_in, pipeline_config
from multinode import TRAIN_SLOT, LocalCluster, where

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


def write_config(
    tmp_path,
    synth_set,
    s3,
    server,
    name: str,
    train: dict,
    ray: dict,
    folder: str = "synth",
    preprocess: dict | None = None,
):
    """A small workflow over the videos in s3://VIDEOS/FOLDER, storage_root in S3, MLflow on the server; returns
    its path."""
    cfg = pipeline_config(
        tmp_path,
        synth_set,
        name=name,
        storage_root=f"s3://{STORAGE}/{name}",
        s3={"endpoint_url": s3},
        data={
            "video_root": f"s3://{VIDEOS}/{folder}",
            "annotations": {split: f"s3://{VIDEOS}/{folder}/annotations/{split}.csv" for split in ("train", "val")},
        },
        # 4 clips a video: epochs of 6 steps (2 workers) or 12 (1); a kill after epoch 1's checkpoint lands in
        # epoch 2.
        preprocess=preprocess or {"clips_per_video": 4, "rows_per_shard": 16},
        train={
            "batch_size": 4,
            "cpus_per_worker": 1,
            "warmup_epochs": 0.5,
            "base_lr": 0.04,
            "max_failures": 3,
            **train,
        },
        mlflow={"tracking_uri": server["url"], "experiment": name, "model_name": name},
        ray={"data_cpus": 1.0, **ray},
        infer={"cpus_per_worker": 1, "decode_cpus": 1},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def run(config) -> tuple[str, ...]:
    return ("python", "-m", "pipelines", "run", "--config", str(config))


def wait_for_checkpoint(
    s3: str, name: str, epoch: int, cluster: LocalCluster, submission: str, timeout: float = 600
) -> None:
    """Until Ray Train lists the run's checkpoint of `epoch` in its snapshot (written once the checkpoint is
    whole): the next epoch is then under way."""
    client = boto3.client("s3", endpoint_url=s3)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for _ in range(10):
            keys = [
                o["Key"]
                for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=STORAGE, Prefix=f"{name}/checkpoints/"
                )
                for o in page.get("Contents", [])
            ]
            for key in keys:
                if (
                    key.endswith("checkpoint_manager_snapshot.json")
                    and f"epoch-{epoch:04d}" in client.get_object(Bucket=STORAGE, Key=key)["Body"].read().decode()
                ):
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


def train_manifests(store: Storage) -> str | None:
    """The one folder of committed train-split manifests, None before the first commit."""
    folders = {posixpath.dirname(p) for p in store.list("manifests/synth/train", suffix=".json")}
    assert len(folders) <= 1, folders
    return folders.pop() if folders else None


def committed_train(store: Storage) -> int:
    """How many of the long set's training videos preprocess has committed."""
    folder = train_manifests(store)
    return len(manifest.DatasetState.load(store, folder).videos) if folder else 0


def registered_versions(server, name: str) -> list:
    return MlflowClient(server["url"]).search_model_versions(f"name='{name}'")


def test_a_survivor_holding_every_cpu_stops_with_a_clear_error_then_resumes_when_a_node_joins(
    cluster, s3, server, synth_set, tmp_path
):
    # No roles: two 1-CPU nodes, one for the train worker and one for Ray Data.
    cluster.add_nodes(("n1", 1, None), ("n2", 1, None))
    config = write_config(
        tmp_path,
        synth_set,
        s3,
        server,
        "starved",
        train={"epochs": 2, "num_workers": 1},
        ray={"data_wait_timeout_s": 20},
    )
    submission = cluster.submit(*run(config))
    names = {v: k for k, v in cluster.node_ids().items()}
    deadline = time.time() + 600
    while not (holder := where(cluster.state("actors", "state=ALIVE"), r"^RayTrainWorker$")):
        assert time.time() < deadline and not cluster.ended(submission), cluster.logs(submission)[-4000:]
        time.sleep(2)
    assert len(holder) == 1
    wait_for_checkpoint(s3, "starved", 1, cluster, submission)
    # Inside epoch 2 (12 steps on 1 worker): Ray Train restarts the worker on the survivor, which then has no CPU
    # left.
    cluster.kill(names[holder.pop()])

    status, log = cluster.wait(submission, timeout=600)
    assert status == "FAILED"
    # The driver's own last word, without a traceback of its own (Ray's controller logs the node's loss).
    said = [
        line
        for line in log.splitlines()
        if "Ray Data made no progress for 20 s" in line and line.startswith("pipelines run: train starved-")
    ]
    assert len(said) == 1, log[-4000:]
    assert re.search(
        r"stopped after epoch 1 of 2\. Ray Data made no progress for 20 s \(ray.data_wait_timeout_s\): "
        r"the training input's read and crop tasks wait for CPUs; the cluster has 2 node\(s\) with 1 "
        r"CPU\(s\) in all, the train workers held 1 of them\. Add a node",
        said[0],
    ), said[0]
    assert said[0].endswith("then run the same command again: it resumes where it stopped.")
    assert 'File "<frozen runpy>"' not in log

    cluster.add_nodes(("n3", 1, None))
    status, log = cluster.wait(cluster.submit(*run(config)))
    assert status == "SUCCEEDED", log[-4000:]
    assert "resuming after epoch 1 " in log, log[-4000:]
    assert [step for step, _ in epoch_metric(server, "starved", "train_loss")] == [1, 2]
    assert [v.version for v in registered_versions(server, "starved")] == ["1"]


CLIPS = 2  # clips cut from each video of the long set (decoding, not cutting, is what takes the time)
COPIES = 4  # times each generated training video is in the long set, under names of its own
TRAIN_VIDEOS = 24 * COPIES


@pytest.fixture(scope="module")
def long_set(s3, tmp_path_factory):
    """Enough videos that a data node dies with most of preprocess still to do, and epochs long enough for a
    train node to die inside one: 32 generated (4 classes x 8, 320x240, 6 s), each training video uploaded
    COPIES times under its own YouTube id (96 to train on, 192 clips), the 8 val videos once. Returns the folder
    with their annotation CSVs."""
    from slowfast.video.synth import write_dataset

    out = tmp_path_factory.mktemp("long-set")
    write_dataset(out / "generated", classes=4, videos_per_class=8, seed=11, width=320, height=240, seconds=6.0)
    client = boto3.client("s3", endpoint_url=s3)
    (out / "annotations").mkdir()
    for split, copies in (("train", COPIES), ("val", 1)):
        with open(out / "generated" / "annotations" / f"{split}.csv") as f:
            rows = list(csv.DictReader(f))
        listed = []
        for row in rows:
            name = f"{row['label']}/{{}}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            for k in range(copies):
                listed.append({**row, "youtube_id": f"{row['youtube_id'][:9]}c{k}"} if copies > 1 else row)
                client.upload_file(
                    str(out / "generated" / split / name.format(row["youtube_id"])),
                    VIDEOS,
                    f"long/{split}/{name.format(listed[-1]['youtube_id'])}",
                )
        with open(out / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(listed)
        client.upload_file(str(out / "annotations" / f"{split}.csv"), VIDEOS, f"long/annotations/{split}.csv")
    return out


def test_roles_autoscaling_and_node_loss_through_job_submit(cluster, s3, server, long_set, tmp_path):
    """The whole workflow with `ray job submit` on a cluster with roles: started with train nodes only, it decodes
    on the data node that joins, loses it mid-preprocess (kill -9) and goes on on a second that joins the running
    preprocess, loses a train node mid-epoch (kill -9) and finishes with elastic training on the train node
    left; Ray's state API says where everything ran."""
    name = "elastic"
    cluster.add_nodes(("train1", 1, "train"), ("train2", 1, "train"))
    # One video per actor call and a commit after each; 24 steps an epoch on 2 workers, 48 on 1: a kill after
    # epoch 1's checkpoint lands inside epoch 2.
    config = write_config(
        tmp_path,
        long_set,
        s3,
        server,
        name,
        folder="long",
        train={"epochs": 2, "num_workers": [1, 2], "resources_per_worker": TRAIN_SLOT},
        ray={"train_nodes": TRAIN_ROLE, "data_nodes": DATA_ROLE},
        preprocess={"clips_per_video": CLIPS, "rows_per_shard": CLIPS, "commit_every": 1, "short_side": 240},
    )
    store = Storage(f"s3://{STORAGE}/{name}", S3Options(s3))

    # A local storage_root on a cluster of several nodes: refused before anything is written.
    local = tmp_path / "local-storage"
    status, log = cluster.wait(cluster.submit(*run(config), "--set", f"storage_root={local}"), timeout=300)
    assert status == "FAILED"
    assert f"storage_root '{local}': a local path, and this Ray cluster has 3 nodes" in log
    assert "--set storage_root=s3://BUCKET/PREFIX" in log and "--set shared_filesystem=true" in log
    assert "Traceback" not in log and not local.exists()

    # Started with no data node (an autoscaler's data group at zero): the decoding waits for one.
    submission = cluster.submit(*run(config))
    cluster.add_nodes(("data1", 1, "data"))
    deadline = time.time() + 600
    while not train_manifests(store):
        assert time.time() < deadline and not cluster.ended(submission), cluster.logs(submission)[-4000:]
        time.sleep(1)

    # The data node dies with its actor mid-video (the first commit is in, the rest to come): kill -9.
    assert committed_train(store) < TRAIN_VIDEOS // 2
    assert cluster.node_ids()["data1"] in where(cluster.state("actors", "state=ALIVE"), "ClipWriter")
    cluster.kill("data1")
    # Left with no node it may decode on, preprocess cannot end before a second data node joins: the node that
    # joins the running preprocess gets the rest of its work (or the run stopped on the loss: the same command
    # resumes, and the node gets the rest from it).
    cluster.add_nodes(("data2", 1, "data"))
    resubmitted, deadline = False, time.time() + 600
    while committed_train(store) < TRAIN_VIDEOS:
        assert time.time() < deadline, cluster.logs(submission)[-4000:]
        if cluster.ended(submission):  # what the lost node was decoding stopped the run: the same command resumes
            status, log = cluster.wait(submission)
            assert status == "FAILED" and not resubmitted, log[-4000:]
            submission, resubmitted = cluster.submit(*run(config)), True
        time.sleep(2)

    # A train node dies mid-epoch: the run resumes on the worker left, batch and LR halved.
    wait_for_checkpoint(s3, name, 1, cluster, submission)
    cluster.kill("train2")
    status, log = cluster.wait(submission)
    assert status == "SUCCEEDED", log[-4000:]
    assert "on 1 to 2 workers (elastic" in log and f"models:/{name}/1" in log
    resumed = re.search(
        r"resuming after epoch 1 on 1 worker\(s\), the checkpoint was written by 2: global "
        r"batch 8 -> 4, LR ([0-9.e-]+) -> ([0-9.e-]+)",
        log,
    )
    assert resumed, log[-4000:]
    assert float(resumed.group(2)) == pytest.approx(float(resumed.group(1)) / 2, rel=1e-3)
    # Each epoch recorded once (none repeated), with the workers, batch and learning rate it ran with.
    assert epoch_metric(server, name, "workers") == [(1, 2), (2, 1)]
    assert epoch_metric(server, name, "global_batch") == [(1, 8), (2, 4)]
    lrs = dict(epoch_metric(server, name, "base_lr"))
    assert lrs[2] == pytest.approx(lrs[1] / 2)
    assert [v.version for v in registered_versions(server, name)] == ["1"]

    # Where each kind of work ran, from Ray's state API (the killed nodes' records included).
    ids = cluster.node_ids(alive=False)
    train_nodes, data_nodes = {ids["train1"], ids["train2"]}, {ids["data1"], ids["data2"]}
    actors, tasks = cluster.state("actors"), cluster.state("tasks")
    assert where(actors, r"^RayTrainWorker$") == train_nodes  # one worker on each, then one on train1
    assert where(actors, r"ScoreViews") == {ids["train1"]}  # evaluate's scoring actors
    # preprocess: on data nodes only (data1 was seen holding a live ClipWriter above; the state API need not
    # keep the records of actors that died with their node, seen once missing)
    assert ids["data2"] in where(actors, r"ClipWriter") <= data_nodes
    for work in ("shuffled_files", "read_shards", "train_clips", "read_views"):  # after data1's loss: data2
        assert where(tasks, work) == {ids["data2"]}, work
    assert not (where(actors, DATA_WORK) | where(tasks, DATA_WORK)) & train_nodes

    # Exactly once: every annotated video committed once, and its clips in exactly one committed shard.
    folder = train_manifests(store)
    assert folder
    commits = manifest.load_commits(store, folder)
    records = Counter(v.video_id for c in commits for v in c.videos)
    with open(long_set / "annotations" / "train.csv") as f:
        annotated = list(csv.DictReader(f))
    assert len(records) == len(annotated) == TRAIN_VIDEOS
    assert set(records.values()) == {1}, [v for v, n in records.items() if n > 1]
    rows = Counter()
    for shard in {s["path"] for c in commits for s in c.shards}:
        with store.fs.open_input_file(store.path(shard)) as f:
            rows.update(pq.read_table(f, columns=["video_id"]).column("video_id").to_pylist())
    processed = {v.video_id for c in commits for v in c.videos if not v.quarantined}
    assert len(processed) == len(annotated) and all(rows[v] == CLIPS for v in processed) and set(rows) == processed
