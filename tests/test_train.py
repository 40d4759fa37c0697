"""Train through a real local Ray (Ray Train + Ray Data) and a real MLflow: two DDP workers on CPU learn from
synthetic shards, checkpoint every epoch and log to MLflow (the session's one trained run, tests/conftest.py's
trained_run, logging to a real `mlflow server`); the same command again trains nothing, and a longer run resumes
after the last checkpoint (into a sqlite MLflow). (A driver killed mid-run and the re-run resuming after the last
checkpoint: tests/test_workflow.py; a node lost: tests/test_multinode.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import CHECKPOINT_FILE
from pipelines.storage import Storage
from pipelines.train import train
from pipelines.train_input import data_cpu_split, read_shards
from slowfast.model import SlowFast, load_checkpoint, resolve

CLIPS = 12 * 16  # tests/conftest.py's trained_config: 12 train videos x 16 pre-sampled clips
STEPS = CLIPS // 16  # per epoch: 2 workers x 8 clips a step
LR = 0.04 * 16 / 64  # base_lr scaled to the global batch


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_workers_learn_checkpoint_every_epoch_and_log_to_mlflow(trained_run):
    cfg, out = trained_run.cfg, trained_run.out

    assert out["epochs_done"] == 2 and out["epochs_run_now"] == 2 and out["resumed_from_epoch"] == 0
    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == out["run_name"]
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["model.preset"] == "slowfast_tiny"
    assert params["global_batch"] == "16" and params["steps_per_epoch"] == str(STEPS)
    assert params["num_classes"] == "4"

    # Per step: every step of both epochs, once, with the warm-up + cosine LR of the scaled base LR.
    loss = history(client, run.info.run_id, "loss")
    assert [step for step, _ in loss] == list(range(1, 2 * STEPS + 1))
    lr = [v for _, v in history(client, run.info.run_id, "lr")]
    assert lr[0] == pytest.approx(LR / 10) and max(lr) == pytest.approx(LR, rel=0.05) and lr[-1] < LR / 10
    for key in ("clips_per_s", "data_wait"):
        assert len(history(client, run.info.run_id, key)) == 2 * STEPS
    assert all(0 <= v <= 1 for _, v in history(client, run.info.run_id, "data_wait"))

    # Per epoch: the loss falls from the first epoch to the second; val figures are fractions.
    train_loss = [v for _, v in history(client, run.info.run_id, "train_loss")]
    assert len(train_loss) == 2 and train_loss[1] < train_loss[0], train_loss
    for key in ("val_top1", "val_top5", "val_loss", "epoch_data_wait", "epoch_clips_per_s", "epoch_s"):
        assert [step for step, _ in history(client, run.info.run_id, key)] == [1, 2], key
    assert all(0 <= v <= 1 for _, v in history(client, run.info.run_id, "val_top1"))
    assert out["metrics"]["val_videos"] == 4 and out["metrics"]["train_clips"] == CLIPS

    # Checkpoints: one per epoch under storage_root/checkpoints/<run>/, each a full training state.
    run_dir = Path(cfg.storage_root) / "checkpoints" / out["run_name"]
    assert out["run_dir"] == str(run_dir)
    assert sorted(p.parent.name for p in run_dir.glob(f"*/{CHECKPOINT_FILE}")) == ["epoch-0001", "epoch-0002"]
    assert out["best_checkpoint"] in out["checkpoints"]
    assert out["best_val_top1"] == max(v for _, v in history(client, run.info.run_id, "val_top1"))
    net = SlowFast(resolve("slowfast_tiny", num_classes=4, fast_input="time_difference"))
    extra = load_checkpoint(net, run_dir / "epoch-0002" / CHECKPOINT_FILE).extra
    assert extra["epoch"] == 2 and extra["global_step"] == 2 * STEPS and len(extra["rng"]) == 2
    assert extra["optimizer"]["state"] and extra["schedule"]["total_epochs"] == 2
    assert len(extra["class_names"]) == 4


def test_the_same_command_trains_nothing_and_a_longer_run_resumes_after_the_last_checkpoint(trained_run, tmp_path):
    cfg, out = trained_run.cfg, trained_run.out
    client = MlflowClient(out["tracking_uri"])
    lines: list[str] = []

    # The same command again: the run is complete, so nothing is trained and MLflow gains nothing.
    again = train(cfg, log=lines.append)
    assert again["run_name"] == out["run_name"] and again["mlflow_run_id"] == out["mlflow_run_id"]
    assert again["epochs_done"] == 2 and again["epochs_run_now"] == 0
    assert again["best_checkpoint"] == out["best_checkpoint"]
    assert len(history(client, out["mlflow_run_id"], "loss")) == 2 * STEPS
    assert any("nothing to do" in line for line in lines)

    # Resumed into an MLflow run that lacks the figures of the epoch it resumes after (as when a run is killed
    # between the checkpoint's commit and their logging): they are logged from the checkpoint, then the new
    # epoch's, each once. On a copy of the run's storage_root: the session's run stays as trained.
    storage = tmp_path / "storage"
    shutil.copytree(cfg.storage_root, storage)
    longer = cfg.model_copy(
        update={
            "storage_root": str(storage),
            "train": cfg.train.model_copy(update={"epochs": 3}),
            "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}),
        }
    )
    checkpoint = storage / "checkpoints" / out["run_name"] / "epoch-0002" / CHECKPOINT_FILE
    net = SlowFast(resolve("slowfast_tiny", num_classes=4, fast_input="time_difference"))
    extra = load_checkpoint(net, checkpoint).extra
    third = train(longer, run_name=out["run_name"], log=lines.append)
    assert third["resumed_from_epoch"] == 2 and third["epochs_run_now"] == 1
    assert third["run_dir"] == str(storage / "checkpoints" / out["run_name"])
    client = MlflowClient(third["tracking_uri"])
    logged = history(client, third["mlflow_run_id"], "train_loss")
    assert logged[0] == (2, pytest.approx(extra["metrics"]["train_loss"]))
    for key in ("train_loss", "val_top1", "epoch_s"):
        assert [step for step, _ in history(client, third["mlflow_run_id"], key)] == [2, 3], key


def test_read_shards_mixes_files_and_drops_superseded_clips(tmp_path):
    def shard(name: str, videos: list[str]) -> str:
        rows = [
            {"video_id": v, "label": i, "clip_index": c, "height": 2, "width": 2, "frames": [b"x"], "slow_index": [0]}
            for i, v in enumerate(videos)
            for c in range(3)
        ]
        path = tmp_path / name
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
        return str(path)

    a, b = shard("a.parquet", ["a0", "a1"]), shard("b.parquet", ["b0"])
    batch = pa.table({"path": [a, b], "skip": ['["a1"]', "[]"]})
    blocks = list(read_shards(batch, Storage(str(tmp_path)), block_rows=4))
    rows = [(r["video_id"], r["clip_index"]) for block in blocks for r in block.to_pylist()]
    assert sorted(rows) == [(v, c) for v in ("a0", "b0") for c in range(3)]
    assert [block.num_rows for block in blocks] == [4, 2]


def test_data_cpus_leave_room_for_a_read_and_an_actor():
    assert data_cpu_split(1.0) == (0.25, 1, 0.75)  # the 2-core machine: 1 CPU for train workers, 1 for data
    assert data_cpu_split(0.5) == (0.125, 1, 0.375)
    read, actors, per_actor = data_cpu_split(32.0)  # a GPU node: 4 CPUs of reads (16 tasks), 28 actors
    assert (read, actors) == (0.25, 28) and 28 * per_actor == pytest.approx(28.0)
