"""Evaluate, register, promote and predict, against a real local Ray and a real MLflow (sqlite): a model
trained on the synthetic set is scored with the multi-view protocol, registered as challenger, promoted
only when it beats the champion on the same eval set, and loads back as PyTorch and as a video pyfunc."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import CHECKPOINT_FILE, ModelNotFound, load_from_checkpoint
from pipelines.evaluate import evaluate
from pipelines.registry import CHALLENGER, CHAMPION, RegistryError, promote, register
from pipelines.storage import Storage
from pipelines.train import train
from slowfast.video.sampling import choose_views

from conftest import REPO, pipeline_config


def skewed_val(tmp: Path, videos: Path) -> str:
    """The val annotations plus one more video of the first class (a train video): 5 val videos, 2 of class
    0, so a constant predictor of class 0 scores 0.4 and of any other class 0.2 (a better and a worse model
    whose figures do not depend on how training went)."""
    train = list(csv.reader((videos / "annotations/train.csv").open()))
    first = sorted({row[0] for row in train[1:]})[0]
    extra = next(row for row in train[1:] if row[0] == first)
    path = tmp / "val_skewed.csv"
    path.write_text(
        (videos / "annotations/val.csv").read_text().rstrip("\n")
        + "\n"
        + ",".join([f'"{extra[0]}"', *extra[1:4], "val"])
        + "\n"
    )
    return str(path)


def small_config(tmp: Path, videos: Path, **sections):
    """slowfast_tiny at 32 px on the 4-class synthetic set (3 train + 1 val video per class), its Fast
    pathway on frame differences (as the demo), 2 short epochs: what these tests check does not depend on how
    well it learnt (the gate is decided by constant predictors of known top-1)."""
    return pipeline_config(
        tmp,
        videos,
        preprocess={"clips_per_video": 4, "rows_per_shard": 16},
        train={
            "epochs": 2,
            "batch_size": 8,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "base_lr": 0.2,
            "warmup_epochs": 0.5,
        },
        mlflow={
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "experiment": "registry-test",
            "model_name": "motion",
        },
        ray={"data_cpus": 1.0},
        model={"preset": "slowfast_tiny", "fast_input": "time_difference"},
        data={
            "dataset": "synth",
            "format": "kinetics_csv",
            "video_root": str(videos),
            "annotations": {"train": str(videos / "annotations/train.csv"), "val": skewed_val(tmp, videos)},
        },
        **sections,
    )


@pytest.fixture(scope="module")
def trained(ray_local, synth_set, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    cfg = small_config(tmp, synth_set)
    out = train(cfg, log=lambda *_: None)
    return cfg, out, tmp


def constant_model(checkpoint: Path, out: Path, predicted: int) -> str:
    """The trained checkpoint with its classifier replaced: every video is `predicted` (top-1 = 1/4 here)."""
    state = torch.load(checkpoint, weights_only=True)
    weight = state["model_state"]["head.fc.weight"]
    state["model_state"]["head.fc.weight"] = torch.zeros_like(weight)
    state["model_state"]["head.fc.bias"] = torch.nn.functional.one_hot(torch.tensor(predicted), len(weight)).float()
    folder = out / f"constant-{predicted}" / "epoch-0001"
    folder.mkdir(parents=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    return str(folder)


def test_choose_views_spreads_the_views_kept():
    assert choose_views(10, 10) == list(range(10))
    assert choose_views(10, 3) == [0, 4, 9] or choose_views(10, 3) == [0, 5, 9]
    assert choose_views(4, 1) == [0] and choose_views(3, 5) == [0, 1, 2]


def test_evaluate_a_checkpoint_with_every_view_and_log_it_to_the_training_run(trained):
    cfg, out, tmp = trained
    result = evaluate(cfg, out["best_checkpoint"], log=lambda *_: None)
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

    # Fewer temporal views is another eval set: the figures are never compared across sets.
    fewer = evaluate(
        cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"temporal_views": 1})}),
        out["best_checkpoint"],
        log=lambda *_: None,
    )
    assert fewer["views_per_video"] == 3 and fewer["eval_set"] != result["eval_set"]


def test_register_promote_only_a_better_model_and_load_it_back(trained):
    cfg, out, tmp = trained
    client = MlflowClient(out["tracking_uri"])
    best = Path(out["best_checkpoint"]) / CHECKPOINT_FILE

    # The first model becomes champion whatever its figure: a constant predictor of class 1 (1 of 5 right).
    weak = evaluate(cfg, constant_model(best, tmp / "constants", 1), log=lambda *_: None)
    assert weak["top1"] == 0.2
    first = promote(cfg, register(cfg, weak, log=lambda *_: None)["model_version"], log=lambda *_: None)
    assert first["promoted"] and first["model_version"] == 1 and first["reason"].startswith("first model")

    # A better one on the same eval set (class 0, 2 of 5 right): promoted, both figures on the version.
    better = evaluate(cfg, constant_model(best, tmp / "constants", 0), log=lambda *_: None)
    assert better["top1"] == 0.4
    reg = register(cfg, better, log=lambda *_: None)
    assert reg["model_version"] == 2 and CHALLENGER in reg["aliases"]
    second = promote(cfg, log=lambda *_: None)  # the challenger, by default
    assert second["promoted"] and second["champion_before"] == 1
    tags = client.get_model_version("motion", "2").tags
    assert tags["slowfast.promotion.decision"] == "promoted"
    assert float(tags["slowfast.promotion.champion_top1"]) == 0.2
    assert float(tags["slowfast.promotion.top1"]) == pytest.approx(0.4)
    assert tags["slowfast.eval_set"] == better["eval_set"] and tags["slowfast.preset"] == "slowfast_tiny"

    # A worse model (class 2, 1 of 5) is registered but never becomes champion.
    worse = evaluate(cfg, constant_model(best, tmp / "constants", 2), log=lambda *_: None)
    third = promote(cfg, register(cfg, worse, log=lambda *_: None)["model_version"], log=lambda *_: None)
    assert not third["promoted"] and third["decision"] == "rejected"
    assert str(client.get_model_version_by_alias("motion", CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias("motion", CHALLENGER).version) == "3"
    assert client.get_model_version("motion", "3").tags["slowfast.promotion.decision"] == "rejected"

    # The trained model registers too (its figure decides nothing here), and again is the same version.
    good = evaluate(cfg, out["best_checkpoint"], log=lambda *_: None)
    assert register(cfg, good, log=lambda *_: None)["model_version"] == 4
    # Registering the same checkpoint again is the same version (a resumed workflow adds none).
    assert register(cfg, good, log=lambda *_: None)["model_version"] == 4

    # The champion loads as the PyTorch module, and as a pyfunc that takes bytes, and paths by opt-in.
    mlflow.set_tracking_uri(out["tracking_uri"])
    net = mlflow.pytorch.load_model("models:/motion@champion")
    assert isinstance(net, torch.nn.Module) and net.head.fc.out_features == 4
    video = next((Path(cfg.data.video_root) / "val").rglob("*.mp4"))
    pyfunc = mlflow.pyfunc.load_model("models:/motion@champion", model_config={"allow_paths": True})
    by_path = pyfunc.predict([str(video)], params={"top_k": 2})
    by_bytes = pyfunc.predict([video.read_bytes()], params={"top_k": 2})
    assert list(by_path["labels"][0]) == list(by_bytes["labels"][0]) and len(by_path["labels"][0]) == 2
    assert by_path["scores"][0][0] >= by_path["scores"][0][1]


def test_predict_cli_prints_the_top_k_for_each_video_and_names_a_missing_model(trained):
    cfg, out, tmp = trained
    config_path = tmp / "pipeline.yaml"
    config_path.write_text(cfg.to_yaml())
    videos = sorted((Path(cfg.data.video_root) / "val").rglob("*.mp4"))[:2]

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipelines", "predict", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )

    if not _has_champion(out):
        promote(
            cfg,
            register(cfg, evaluate(cfg, out["best_checkpoint"], log=lambda *_: None), log=lambda *_: None)[
                "model_version"
            ],
            log=lambda *_: None,
        )
    done = cli(*map(str, videos), "--top-k", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    for video in videos:
        assert str(video) in done.stdout
    assert done.stdout.count(" 1. ") == 2 and done.stdout.count(" 3. ") == 2

    missing = cli(str(videos[0]), "--model-uri", "models:/no-such-model@champion")
    assert missing.returncode == 1
    assert "no registered model 'no-such-model'" in missing.stderr and "motion" in missing.stderr

    missing_alias = cli(str(videos[0]), "--model-uri", "models:/motion@nope")
    assert missing_alias.returncode == 1 and "aliases" in missing_alias.stderr


def test_promote_without_a_challenger_says_what_to_do(tmp_path, synth_set):
    cfg = small_config(tmp_path, synth_set)
    with pytest.raises(RegistryError, match="no registered model 'motion'"):
        promote(cfg, log=lambda *_: None)
    with pytest.raises(ModelNotFound, match="no checkpoint under"):
        evaluate(cfg, None, log=lambda *_: None)


def _has_champion(out) -> bool:
    try:
        MlflowClient(out["tracking_uri"]).get_model_version_by_alias("motion", CHAMPION)
    except Exception:  # noqa: BLE001 - no such model or alias
        return False
    return True


def test_a_checkpoint_from_elsewhere_is_refused_with_the_reason(tmp_path):
    bad = tmp_path / "bare.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ModelNotFound, match="not a checkpoint written by"):
        load_from_checkpoint(Storage(str(tmp_path)), str(bad))
