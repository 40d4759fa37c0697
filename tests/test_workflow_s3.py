"""Nothing outside storage_root: the workflow with storage_root on S3 (the moto endpoint) and a sqlite
tracking database writes shards, checkpoints and the registered model's files to the bucket, leaves nothing
in its working directory, and the champion loads from the registry after that directory is gone.

Both the run and the load are processes of their own: the run's working directory is its Ray's too (a Ray
started by this process would keep this process's), and the load must find everything in a fresh shell."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import boto3

from pipelines.workflow import STEPS, list_runs

from conftest import REPO, pipeline_config

BUCKET = "wf-bucket"


def test_the_registered_model_lives_under_an_s3_storage_root(s3_endpoint, synth_set, tmp_path):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    db = tmp_path / "tracking" / "mlflow.db"
    db.parent.mkdir()
    cfg = pipeline_config(
        tmp_path,
        synth_set,
        storage_root=f"s3://{BUCKET}/wf",
        s3={"endpoint_url": s3_endpoint},
        preprocess={"clips_per_video": 2, "rows_per_shard": 8},
        train={
            "epochs": 1,
            "batch_size": 4,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "base_lr": 0.04,
            "warmup_epochs": 0.5,
        },
        mlflow={"tracking_uri": f"sqlite:///{db}", "experiment": "wf-s3", "model_name": "wf-s3"},
        ray={"data_cpus": 1.0},
    )
    config = tmp_path / "pipeline.yaml"
    config.write_text(cfg.to_yaml())
    workdir = tmp_path / "job-workdir"  # stands for ray job submit's copy of the working dir, or a pod's
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)  # the config's s3.endpoint_url must be enough
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "--config", str(config)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in workdir.iterdir()) == []  # no ./mlruns, no ./mlflow.db, nothing
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]
    # A fresh run's records: every step done, the first version promoted to champion.
    (record,) = list_runs(cfg)
    summary = record["summary"]
    assert record["status"] == "succeeded"
    assert {k: v["status"] for k, v in summary["steps"].items()} == dict.fromkeys(STEPS, "done")
    assert summary["model_uri"] == "models:/wf-s3/1" and summary["model_version"] == 1 and summary["promoted"]
    assert set(summary["aliases"]) == {"champion", "challenger"}
    assert 0 <= summary["metrics"]["top1"] <= summary["metrics"]["top5"] <= 1
    train = record["step_records"]["train"]
    assert train["outputs"]["epochs_done"] == 1
    assert train["config_hash"] == cfg.config_hash("data", "preprocess", "model", "train")

    keys = [
        o["Key"]
        for page in boto3.client("s3", endpoint_url=s3_endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix="wf/")
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("wf/shards/") for k in keys) and any(k.startswith("wf/checkpoints/") for k in keys)
    model_files = [k for k in keys if k.startswith("wf/mlartifacts/") and k.endswith("/MLmodel")]
    assert model_files, keys

    shutil.rmtree(workdir)
    elsewhere = tmp_path / "a-fresh-shell"
    elsewhere.mkdir()
    video = next((synth_set / "val").rglob("*.mp4"))
    load = (
        "import json, mlflow\n"
        "clf = mlflow.pyfunc.load_model('models:/wf-s3@champion', model_config={'allow_paths': True})\n"
        f"out = clf.predict([{str(video)!r}], params={{'top_k': 2}})\n"
        "print(json.dumps({'labels': list(out['labels'][0]), 'uri': mlflow.get_tracking_uri()}))\n"
    )
    shell = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    loaded = subprocess.run(
        [sys.executable, "-c", load], cwd=elsewhere, env=shell, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    labels = json.loads(loaded.stdout.strip().splitlines()[-1])["labels"]
    classes = {row["label"] for row in csv.DictReader((synth_set / "annotations/train.csv").open())}
    assert len(labels) == 2 and set(labels) <= classes, (labels, classes)
