"""What a user sees while a command runs, in real processes with a real local Ray: the pipeline's own
progress lines, not Ray's INFO logs or tracebacks from Ray's helpers; `--verbose` brings Ray's logs back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # every test here watches a process of its own

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
# Ray's Python log format, "<time>\tINFO streaming_executor.py:215 -- Starting execution of Dataset ..."
RAY_INFO = re.compile(r"\tINFO \w+\.py:\d+ -- ")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 motion classes x 2 videos, 1.2 s: enough for a train and a val split."""
    from slowfast.video.synth import write_dataset

    out = tmp_path_factory.mktemp("videos")
    write_dataset(out, classes=3, videos_per_class=2, seed=0, width=84, height=64, seconds=1.2)
    return out


def cli(*args: str, videos: Path, storage: Path) -> tuple[int, str, str]:
    overrides = [
        f"storage_root={storage}",
        f"mlflow.tracking_uri=sqlite:///{storage}/mlflow.db",
        f"data.video_root={videos}",
        f"data.annotations.train={videos}/annotations/train.csv",
        f"data.annotations.val={videos}/annotations/val.csv",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "train.batch_size=2",
    ]
    # As from a user's shell: no Ray address, and no RAY_AUTH_MODE (a local Ray started earlier in this process
    # set it to "token", as Ray does when it turns token auth on).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_LOG_LEVEL", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", *args, "--config", DEMO, *[a for o in overrides for a in ("--set", o)]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def quiet_preprocess(videos, tmp_path_factory):
    storage = tmp_path_factory.mktemp("quiet")
    return storage, cli("preprocess", videos=videos, storage=storage)


def test_preprocess_shows_progress_not_ray_logs(quiet_preprocess):
    _, (code, out, err) = quiet_preprocess
    assert code == 0, err
    assert "preprocess train: 3 rows = 3 processed + 0 quarantined" in out
    assert out.rstrip().splitlines()[-1].startswith("summary: train: 3 videos, 12 clips")
    both = out + err
    assert not RAY_INFO.search(both), both
    assert "Execution plan of Dataset" not in both
    assert "Traceback" not in both
    assert "Token authentication is enabled" not in both  # the new local Ray's notice (token auth stays on)


def test_verbose_brings_back_ray_logs(videos, tmp_path):
    code, out, err = cli("preprocess", "--verbose", videos=videos, storage=tmp_path / "verbose")
    assert code == 0, err
    assert out.rstrip().splitlines()[-1].startswith("summary: train: 3 videos, 12 clips")
    assert RAY_INFO.search(err), err
    assert "Execution plan of Dataset" in err
    assert "Token authentication is enabled" in err


def test_train_shows_epochs_not_ray_internals(quiet_preprocess, videos):
    storage, _ = quiet_preprocess
    code, out, err = cli("train", videos=videos, storage=storage)
    assert code == 0, err
    both = out + err
    assert re.search(r"\(RayTrainWorker pid=\d+\)\S* epoch 1/1: loss \d", both), both
    assert "summary: run demo-" in out
    assert not RAY_INFO.search(both), both
    assert "Execution plan of Dataset" not in both
    assert "TrainingReport(" not in both  # Ray Train's per-epoch dict of every metric
    # Ray Train's placement-group cleaner died with a traceback when it could not reach the State API.
    # (Other Ray tracebacks are warnings a user should see, e.g. a resource request timing out on an
    # overloaded machine.)
    assert "PlacementGroupCleaner" not in both
    assert "Exception in thread" not in both
