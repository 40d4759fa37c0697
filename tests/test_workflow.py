"""The workflow (`python -m pipelines run`) end to end: a real local Ray, real videos, a real MLflow (sqlite).
kill -9 of the command (its driver and the local Ray it started) during preprocess and during train, then the same
command again, finishes with exactly one registered version; a run with nothing new skips every step; new
annotation rows are the only videos decoded by the next run, which retrains and records its promotion decision.

Only the runs that are killed are separate processes; the others call the CLI (or `run`) in this process, on the
session's Ray. A fresh run's records (every step done): tests/test_workflow_s3.py."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.cli import EXIT_OK, main
from pipelines.workflow import STEPS, list_runs, run, select_steps

from conftest import REPO, pipeline_config
from stop_hook import stop_after, wait_stopped

QUIET = {"log": lambda *_: None}


def workflow_config(tmp: Path, videos: Path):
    """slowfast_tiny at 32 px on a synthetic set, 2 clips a video, 2 epochs, 1 train worker, sqlite MLflow in tmp;
    one video per shard and one shard per commit, so that a kill lands between two videos."""
    return pipeline_config(
        tmp,
        videos,
        preprocess={"clips_per_video": 2, "rows_per_shard": 2, "commit_every": 1},
        train={
            "epochs": 2,
            "batch_size": 4,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "base_lr": 0.04,
            "warmup_epochs": 0.5,
        },
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "wf", "model_name": "wf"},
        ray={"data_cpus": 1.0},
    )


def registered_versions(cfg) -> list[str]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{cfg.mlflow.model_name}'"))


def test_select_steps():
    assert select_steps() == list(STEPS)
    assert select_steps(from_step="evaluate") == ["evaluate", "register"]
    assert select_steps(only="train") == ["train"]


def _write(cfg, tmp: Path) -> str:
    path = tmp / "pipeline.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


def _cli_run(config_path: str, log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines", "run", "--config", config_path],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            **kw,
        )


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()


def test_killed_twice_the_same_command_finishes_then_reruns_redo_only_what_is_new(ray_local, tmp_path, capsys):
    """One scenario, each part starting from what the last one left: kill -9 during preprocess and during train, then
    the same command finishes with exactly one registered version; the same command with nothing new skips every
    step; new annotation rows are the only videos decoded, and the model retrained goes through the gate."""
    from slowfast.video.synth import write_dataset

    videos, extra = tmp_path / "videos", tmp_path / "extra"
    write_dataset(videos, classes=3, videos_per_class=4, seed=5, width=64, height=48, seconds=1.0)
    cfg = workflow_config(tmp_path, videos)
    config_path = _write(cfg, tmp_path)
    storage, log = tmp_path / "storage", tmp_path / "run.log"
    manifests = storage / "manifests"

    def commits() -> int:
        return len(list(manifests.rglob("*.json"))) if manifests.exists() else 0

    # 1. Killed during preprocess, right after its second commit (the driver stops itself there).
    env = stop_after(tmp_path, "slowfast.shards.manifest:commit", 2)
    proc = _cli_run(config_path, log, env=env, start_new_session=True)
    wait_stopped(proc, 300, "preprocess's second commit", log)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert commits() == 2

    # 2. Killed during train, after epoch 1's checkpoint.
    def checkpointed() -> bool:
        snapshots = storage.glob("checkpoints/*/checkpoint_manager_snapshot.json")
        return any("epoch-0001" in p.read_text() for p in snapshots)

    _kill_when(_cli_run(config_path, log, start_new_session=True), checkpointed, log)
    runs = list_runs(cfg)
    second_preprocess = runs[0]["step_records"]["preprocess"]
    assert second_preprocess["status"] == "done"
    total = 3 * 4
    # Only the videos not committed before the first kill were decoded again.
    assert second_preprocess["outputs"]["decoded_now"] == total - 2
    assert runs[0]["step_records"]["train"]["status"] == "running"

    # 3. The same command again, here (nothing of the killed runs lives on in this process or its Ray): preprocess
    # skipped, train resumes after epoch 1, one version registered.
    capsys.readouterr()
    assert main(["run", "--config", config_path]) == EXIT_OK
    said = _read_until(capsys, "resuming after epoch 1 ")  # a train worker's line, relayed by Ray as it comes
    runs = list_runs(cfg)
    steps, first = runs[0]["step_records"], runs[0]["summary"]
    assert steps["preprocess"]["status"] == "skipped" and steps["preprocess"]["outputs"]["decoded_now"] == 0
    assert steps["train"]["status"] == "done" and steps["train"]["outputs"]["resumed_from_epoch"] == 1
    assert steps["train"]["outputs"]["epochs_done"] == 2
    assert steps["train"]["config_hash"] == cfg.config_hash("data", "preprocess", "model", "train")
    assert steps["evaluate"]["status"] == "done" and steps["register"]["status"] == "done"
    assert steps["register"]["outputs"]["model_version"] == 1
    assert first["model_version"] == 1 and first["promoted"] and set(first["aliases"]) == {"champion", "challenger"}
    assert first["model_uri"] == "models:/wf/1" and 0 <= first["metrics"]["top1"] <= first["metrics"]["top5"] <= 1
    assert runs[0]["status"] == "succeeded" and len(runs) == 3
    assert registered_versions(cfg) == ["1"]
    assert "resuming after epoch 1 " in said, said[-3000:]
    # One MLflow training run across the attempts, each epoch's figures logged once.
    client = MlflowClient(cfg.mlflow.tracking_uri)
    trained = [
        r
        for r in client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
        if "val_top1" in r.data.metrics
    ]
    assert len(trained) == 1 and trained[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(trained[0].info.run_id, "train_loss")] == [1, 2]

    # 4. The same command with nothing new: every step skipped, the same model and figures.
    second = run(cfg, **QUIET)
    assert second["run_id"] != first["run_id"]
    assert {k: v["status"] for k, v in second["steps"].items()} == {
        "ingest": "done",
        "preprocess": "skipped",
        "train": "skipped",
        "evaluate": "skipped",
        "register": "skipped",
    }
    assert second["model_version"] == 1 and second["promoted"] and second["metrics"] == first["metrics"]
    assert registered_versions(cfg) == ["1"]

    # --only / --from reuse what is committed; --force evaluate scores the model again.
    only = run(cfg, only="evaluate", force=["evaluate"], **QUIET)
    assert only["steps"] == {"evaluate": {"status": "done", "wall_s": only["steps"]["evaluate"]["wall_s"]}}
    assert only["metrics"]["top1"] == first["metrics"]["top1"]
    runs = list_runs(cfg)
    assert [r["run_id"] for r in runs[:3]] == [only["run_id"], second["run_id"], first["run_id"]]
    assert all(r["status"] == "succeeded" for r in runs[:3])

    capsys.readouterr()
    assert main(["status", "--config", config_path]) == EXIT_OK
    status = capsys.readouterr().out
    assert first["run_id"] in status and "models:/wf/1" in status
    assert "preprocess  skipped" in status

    # 5. One more training video per class, from another seed, added to the train annotations: only those are
    # decoded, and a new model is trained (all its epochs: another run) and goes through the gate.
    write_dataset(extra, classes=3, videos_per_class=2, seed=8, width=64, height=48, seconds=1.0, val_fraction=0.5)
    new_rows = list(csv.reader((extra / "annotations/train.csv").open()))[1:]
    for label, youtube_id, *_ in new_rows:
        src = next((extra / "train" / label).glob(f"{youtube_id}_*.mp4"))
        (videos / "train" / label / src.name).write_bytes(src.read_bytes())
    with (videos / "annotations/train.csv").open("a", newline="") as f:
        csv.writer(f).writerows(new_rows)

    retrained = run(cfg, **QUIET)
    records = {r["run_id"]: r for r in list_runs(cfg)}[retrained["run_id"]]["step_records"]
    assert records["preprocess"]["outputs"]["decoded_now"] == len(new_rows) == 3
    assert records["train"]["status"] == "done" and records["train"]["outputs"]["epochs_run_now"] == 2
    assert retrained["model_version"] == 2
    assert retrained["decision"] in ("promoted", "rejected") and retrained["reason"]
    tags = MlflowClient(cfg.mlflow.tracking_uri).get_model_version("wf", "2").tags
    assert tags["slowfast.promotion.decision"] == retrained["decision"]
    assert tags["slowfast.promotion.champion_version"] == "1"
    champion = MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias("wf", "champion")
    assert str(champion.version) == ("2" if retrained["promoted"] else "1")


def _read_until(capsys, text: str, timeout_s: float = 30) -> str:
    """What this process printed (stdout and stderr) until `text` shows, or `timeout_s` passes."""
    said, deadline = "", time.time() + timeout_s
    while True:
        out, err = capsys.readouterr()
        said += out + err
        if text in said or time.time() > deadline:
            return said
        time.sleep(0.2)
