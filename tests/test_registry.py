"""Evaluate, register, promote and predict, against a real local Ray and a real MLflow: the session's trained
run (tests/conftest.py: trained_run, logged to a real `mlflow server`) is scored with the multi-view protocol,
registered as challenger, promoted only when it beats the champion on the same eval set (conftest's gate), and
loads back as PyTorch and as a video pyfunc. (The same gate read back through the server with a plain client,
and its files in the bucket: tests/test_mlflow_server.py.)"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import ModelNotFound, load_from_checkpoint
from pipelines.cli import EXIT_FAILED, EXIT_OK, main
from pipelines.evaluate import evaluate
from pipelines.registry import CHALLENGER, CHAMPION, RegistryError, promote
from pipelines.storage import Storage
from pipelines.tracking import use_tracking
from slowfast.video.sampling import choose_views

from conftest import MOTION_MODEL, pipeline_config


def test_choose_views_spreads_the_views_kept():
    assert choose_views(10, 10) == list(range(10))
    assert choose_views(10, 3) == [0, 4, 9] or choose_views(10, 3) == [0, 5, 9]
    assert choose_views(4, 1) == [0] and choose_views(3, 5) == [0, 1, 2]


def test_evaluate_a_checkpoint_with_every_view_and_log_it_to_the_training_run(trained_run, gate):
    cfg, out, result = gate.cfg, trained_run.out, gate.good  # the trained checkpoint, evaluated by the gate
    assert result["model_uri"] == out["best_checkpoint"] and result["train_run"] == out["run_name"]
    assert result["num_videos"] == 5 and result["views_per_video"] == 3 * 3  # 3 temporal x 3 spatial
    assert 0 <= result["top1"] <= result["top5"] <= 1 and result["top5"] == 1.0  # 4 classes: all in the top 5
    assert sum(map(sum, result["confusion"])) == 5 and len(result["per_class"]) == 4
    folder = Path(result["artifacts"])
    rows = list(csv.DictReader(io.StringIO((folder / "per_class.csv").read_text())))
    assert [r["class"] for r in rows] == [c["name"] for c in result["per_class"]]
    assert (folder / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "result.json").read_text())["eval_set"] == result["eval_set"]

    # Into the MLflow run that trained the checkpoint: figures, tag and artifacts.
    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.metrics["eval_top1"] == pytest.approx(result["top1"])
    assert run.data.tags["slowfast.eval_set"] == result["eval_set"]
    assert {"slowfast.manifest_hash", "slowfast.git_commit", "slowfast.preset"} <= set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "evaluation"} <= artifacts
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)

    # Fewer temporal views is another eval set: the figures are never compared across sets. (Of a constant model:
    # its checkpoint is no training run's, so the trained run's figures stay those of the set above.)
    fewer = evaluate(
        cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"temporal_views": 1})}),
        str(gate.constants / "constant-1" / "epoch-0001"),
        log=lambda *_: None,
    )
    assert fewer["views_per_video"] == 3 and fewer["eval_set"] != result["eval_set"]


def test_register_promote_only_a_better_model_and_load_it_back(gate):
    client = MlflowClient(gate.cfg.mlflow.tracking_uri)

    # The first model becomes champion whatever its figure: a constant predictor of class 1 (1 of 5 right).
    assert gate.weak["top1"] == 0.2
    assert gate.first["promoted"] and gate.first["model_version"] == 1
    assert gate.first["reason"].startswith("first model")

    # A better one on the same eval set (class 0, 2 of 5 right): promoted, both figures on the version.
    assert gate.better["top1"] == 0.4
    assert gate.better_registered["model_version"] == 2 and CHALLENGER in gate.better_registered["aliases"]
    second = gate.second  # promoted by promote()'s default: the challenger
    assert second["promoted"] and second["model_version"] == 2 and second["champion_before"] == 1
    tags = client.get_model_version(MOTION_MODEL, "2").tags
    assert tags["slowfast.promotion.decision"] == "promoted"
    assert float(tags["slowfast.promotion.champion_top1"]) == 0.2
    assert float(tags["slowfast.promotion.top1"]) == pytest.approx(0.4)
    assert tags["slowfast.eval_set"] == gate.better["eval_set"] and tags["slowfast.preset"] == "slowfast_tiny"

    # A worse model (class 2, 1 of 5) is registered but never becomes champion: challenger, as promote left it.
    third = gate.third
    assert not third["promoted"] and third["decision"] == "rejected" and third["model_version"] == 3
    assert third["aliases"] == [CHALLENGER]
    assert str(client.get_model_version_by_alias(MOTION_MODEL, CHAMPION).version) == "2"
    assert client.get_model_version(MOTION_MODEL, "3").tags["slowfast.promotion.decision"] == "rejected"

    # The trained model registers too (its figure decides nothing here), and again is the same version (a resumed
    # workflow adds none); the challenger is it.
    assert gate.good_registered["model_version"] == 4 and gate.good_again["model_version"] == 4
    assert str(client.get_model_version_by_alias(MOTION_MODEL, CHALLENGER).version) == "4"

    # The champion loads as the PyTorch module, and as a pyfunc that takes bytes, and paths by opt-in.
    with use_tracking(gate.cfg):  # MLflow's tracking URI, the server's, for these loads only
        net = mlflow.pytorch.load_model(f"models:/{MOTION_MODEL}@champion")
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MOTION_MODEL}@champion", model_config={"allow_paths": True})
    assert isinstance(net, torch.nn.Module) and net.head.fc.out_features == 4
    video = next((Path(gate.cfg.data.video_root) / "val").rglob("*.mp4"))
    by_path = pyfunc.predict([str(video)], params={"top_k": 2})
    by_bytes = pyfunc.predict([video.read_bytes()], params={"top_k": 2})
    assert list(by_path["labels"][0]) == list(by_bytes["labels"][0]) and len(by_path["labels"][0]) == 2
    assert by_path["scores"][0][0] >= by_path["scores"][0][1]


def test_predict_cli_prints_the_top_k_for_each_video_and_names_a_missing_model(gate, tmp_path, capsys):
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(gate.cfg.to_yaml())
    videos = sorted((Path(gate.cfg.data.video_root) / "val").rglob("*.mp4"))[:2]

    def cli(*args) -> tuple[int, str, str]:
        """`python -m pipelines predict ARGS --config ...`, run in this process (pipelines.cli.main)."""
        code = main(["predict", *args, "--config", str(config_path)])
        done = capsys.readouterr()
        return code, done.out, done.err

    code, printed, err = cli(*map(str, videos), "--top-k", "3")  # the gate's champion
    assert code == EXIT_OK, err[-2000:]
    for video in videos:
        assert str(video) in printed
    assert printed.count(" 1. ") == 2 and printed.count(" 3. ") == 2

    code, _, err = cli(str(videos[0]), "--model-uri", "models:/no-such-model@champion")
    assert code == EXIT_FAILED
    assert "no registered model 'no-such-model'" in err and MOTION_MODEL in err

    code, _, err = cli(str(videos[0]), "--model-uri", f"models:/{MOTION_MODEL}@nope")
    assert code == EXIT_FAILED and "aliases" in err


def test_promote_without_a_challenger_says_what_to_do(tmp_path, synth_set):
    cfg = pipeline_config(
        tmp_path,
        synth_set,
        mlflow={
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": "registry-test",
            "model_name": "motion",
        },
    )
    with pytest.raises(RegistryError, match="no registered model 'motion'"):
        promote(cfg, log=lambda *_: None)
    with pytest.raises(ModelNotFound, match="no checkpoint under"):
        evaluate(cfg, None, log=lambda *_: None)


def test_a_checkpoint_from_elsewhere_is_refused_with_the_reason(tmp_path):
    bad = tmp_path / "bare.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ModelNotFound, match="not a checkpoint written by"):
        load_from_checkpoint(Storage(str(tmp_path)), str(bad))
