"""The pipeline against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to the moto S3
endpoint): what train, evaluate, register and promote write reads back through the server, the artifacts
live in the bucket, and a model URI that names nothing registered fails with a clear message. The training and the
gate are the session's (tests/conftest.py: trained_run, logged to the server by its Ray Train workers, and gate);
what they decided: tests/test_train.py and tests/test_registry.py."""

from __future__ import annotations

import math
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import CHECKPOINT_FILE, ModelNotFound, load_model
from pipelines.cli import EXIT_FAILED, main
from pipelines.registry import CHALLENGER, CHAMPION
from pipelines.storage import Storage
from pipelines.tracking import use_tracking

from conftest import MOTION_BUCKET, MOTION_MODEL


def bucket_keys(s3_endpoint: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=MOTION_BUCKET, Prefix="mlflow/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_the_training_run_reads_back_through_the_server_with_its_artifacts_in_the_bucket(
    trained_run, gate, mlflow_server, tmp_path
):
    cfg, out, good = trained_run.cfg, trained_run.out, gate.good
    epochs = cfg.train.epochs
    assert out["tracking_uri"] == mlflow_server["url"] and out["epochs_done"] == epochs
    client = MlflowClient(tracking_uri=mlflow_server["url"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == out["run_name"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied, not s3://

    # Params and metrics, as the Ray workers and the driver logged them over HTTP.
    params = run.data.params
    assert params["train.epochs"] == str(epochs) and params["model.preset"] == "slowfast_tiny"
    assert params["num_classes"] == "4" and params["run_name"] == out["run_name"]
    train_loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert [step for step, _ in train_loss] == list(range(1, epochs + 1))
    # What the worker reported, read back. (That the loss falls: tests/test_train.py.)
    assert train_loss[-1][1] == pytest.approx(out["metrics"]["train_loss"])
    assert all(math.isfinite(v) for _, v in train_loss)
    assert run.data.metrics["eval_top1"] == pytest.approx(good["top1"])
    assert run.data.tags["slowfast.eval_set"] == good["eval_set"]

    # Artifacts: listed and downloaded through the server, stored in the moto bucket.
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "evaluation"} <= listed, listed
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/confusion.png",
        "evaluation/per_class.csv",
        "evaluation/result.json",
    }
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", dst_path=str(tmp_path)))
    assert config_yaml.read_text() == cfg.to_yaml()
    keys = bucket_keys(mlflow_server["s3"])
    prefix = f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/"
    for name in ("config.yaml", "learning_curve.png", "evaluation/confusion.png", "evaluation/result.json"):
        assert prefix + name in keys, (name, keys)
    s3 = boto3.client("s3", endpoint_url=mlflow_server["s3"])
    png = s3.get_object(Bucket=MOTION_BUCKET, Key=prefix + "learning_curve.png")["Body"].read()
    assert png[:4] == b"\x89PNG"
    assert not (mlflow_server["cwd"] / "mlartifacts").exists(), "artifacts fell back to the server's local folder"


def test_promotion_gate_through_the_server_promotes_the_better_model_and_rejects_the_worse(gate, mlflow_server):
    # The gate (tests/conftest.py): constant predictors of class 1 (0.2, first: champion), 0 (0.4, better:
    # promoted), 2 (0.2, worse: rejected), then the trained checkpoint registered twice (one version).
    assert gate.weak["top1"] == 0.2 and gate.better["top1"] == 0.4 and gate.worse["top1"] == 0.2
    assert gate.first["promoted"] and gate.first["model_version"] == 1
    assert gate.first["reason"].startswith("first model")
    assert gate.second["promoted"] and gate.second["model_version"] == 2 and gate.second["champion_before"] == 1
    assert not gate.third["promoted"] and gate.third["decision"] == "rejected" and gate.third["model_version"] == 3

    # Versions, aliases and the gate's tags, read back with a plain client of the server.
    client = MlflowClient(tracking_uri=mlflow_server["url"], registry_uri=mlflow_server["url"])
    versions = {v.version: v for v in client.search_model_versions(f"name='{MOTION_MODEL}'")}
    assert sorted(map(int, versions)) == [1, 2, 3, 4]
    assert client.get_registered_model(MOTION_MODEL).aliases == {CHAMPION: "2", CHALLENGER: "4"}
    assert client.get_model_version_by_alias(MOTION_MODEL, CHAMPION).version == "2"
    v2, v3 = client.get_model_version(MOTION_MODEL, "2"), client.get_model_version(MOTION_MODEL, "3")
    assert v2.tags["slowfast.promotion.decision"] == "promoted"
    assert float(v2.tags["slowfast.promotion.top1"]) == pytest.approx(0.4)
    assert v2.tags["slowfast.promotion.champion_version"] == "1"
    assert float(v2.tags["slowfast.promotion.champion_top1"]) == 0.2
    better = gate.better
    assert (
        v2.tags["slowfast.checkpoint"] == better["model_uri"] and v2.tags["slowfast.eval_set"] == gate.good["eval_set"]
    )
    assert v3.tags["slowfast.promotion.decision"] == "rejected"
    assert float(v3.tags["slowfast.promotion.champion_top1"]) == pytest.approx(0.4)

    # The models' files (MLmodel, weights) are in the bucket too, one logged model per version.
    mlmodels = [k for k in bucket_keys(mlflow_server["s3"]) if k.endswith("/MLmodel")]
    assert len(mlmodels) == 4, mlmodels
    for version in versions.values():
        model_id = version.source.removeprefix("models:/")
        assert sum(f"/{model_id}/" in k for k in mlmodels) == 1, (version.version, model_id, mlmodels)

    # The champion loads through the server, with the better checkpoint's weights.
    with use_tracking(gate.cfg):
        net = mlflow.pytorch.load_model(f"models:/{MOTION_MODEL}@{CHAMPION}")
    checkpoint = torch.load(Path(better["model_uri"]) / CHECKPOINT_FILE, weights_only=True)
    assert isinstance(net, torch.nn.Module) and net.head.fc.out_features == 4
    assert torch.equal(net.head.fc.weight.detach().cpu(), checkpoint["model_state"]["head.fc.weight"])


def test_a_model_uri_that_names_nothing_registered_says_what_exists(gate, mlflow_server, tmp_path, capsys):
    cfg = gate.cfg
    with pytest.raises(ModelNotFound) as raised:
        load_model(cfg, Storage(cfg.storage_root), "models:/nope@champion")
    message = str(raised.value)
    assert "no registered model 'nope'" in message and mlflow_server["url"] in message and MOTION_MODEL in message

    # `python -m pipelines predict`, run in this process (pipelines.cli.main).
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(cfg.to_yaml())
    video = next((Path(cfg.data.video_root) / "val").rglob("*.mp4"))
    code = main(["predict", str(video), "--model-uri", "models:/nope@champion", "--config", str(config_path)])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err[-2000:]
    assert "no registered model 'nope'" in err and mlflow_server["url"] in err
    assert f"registered: {MOTION_MODEL}" in err and "Traceback" not in err
