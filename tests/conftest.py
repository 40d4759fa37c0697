"""Shared test fixtures: a real local Ray, a real S3 endpoint (moto_server on 127.0.0.1), a real `mlflow server`, a
small synthetic Kinetics-format video set encoded with PyAV, and the session's one Ray Train run with the promotion
gate run on its checkpoint (what tests/test_train.py, test_registry.py and test_mlflow_server.py check)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

# Dummy credentials for the local S3 endpoint, set before any Ray worker starts so workers inherit
# them; never real ones (the standard AWS chain would otherwise find a developer's own).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]

# Ray Data sets up its log handlers when it is first imported, on the sys.stderr of that moment: imported here, that
# is pytest's session-long stream, not the stream of whichever test happens to import it first (a test's capsys
# stream is closed when the test ends, and every later Ray Data log line would then fail with "Logging error").
import ray.data  # noqa: E402, F401

# `make check` (pytest --check) runs the tests that start no Ray, server or subprocess. A test is heavy when it
# asks for one of these fixtures (directly or through another fixture), or says so with @pytest.mark.heavy
# (a subprocess of its own, or minutes of CPU).
HEAVY_FIXTURES = {"ray_local", "s3_endpoint", "server", "mlflow_server"}  # the last two: `mlflow ... serve` processes


def pytest_addoption(parser):
    parser.addoption(
        "--check",
        action="store_true",
        help="the fast tier (make check): only tests that start no Ray, server or subprocess",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("multinode"):
            item.add_marker(pytest.mark.heavy)
    if config.getoption("--check"):
        heavy = [item for item in items if item.get_closest_marker("heavy")]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if not item.get_closest_marker("heavy")]


def pytest_configure(config):
    """Under --check, a test (or a fixture it asks for) that starts a subprocess or Ray fails, naming the fix,
    instead of slowing the tier down."""
    if not config.getoption("--check"):
        return
    import platform

    import ray

    # Importing mlflow asks platform for the processor, which Python answers once by running `uname -p`: asked
    # here, before the guard, so that a module importing mlflow still collects.
    platform.processor()

    popen = subprocess.Popen.__init__

    def refuse(*_, **__):
        pytest.fail("this test is not for `make check`: it starts a subprocess or Ray; mark it @pytest.mark.heavy")

    def refuse_but_git(self, args, *rest, **kwargs):
        # MLflow asks `git` for the commit of every run it creates: a library's quick question, not the test's process.
        command = args if isinstance(args, str) else (args[0] if args else "")
        if os.path.basename(str(command).split()[0] if command else "") == "git":
            return popen(self, args, *rest, **kwargs)
        refuse()

    subprocess.Popen.__init__ = refuse_but_git
    ray.init = refuse


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL."""
    import signal

    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; on the server's exit or timeout, stop it and fail with its log."""
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            pytest.fail(f"{url} did not answer:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def load_benchmark(name: str, monkeypatch=None):
    """benchmarks/bench_<name>.py, loaded by path as `python -m pipelines bench <name>` loads it. With
    `monkeypatch`, registered under its module name for the test (spawned workers find its functions by it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, spec.name, module)
        monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the session (2 CPUs, as on the dev machines)."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance, never a cluster that another process started with `ray start`
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto_server on 127.0.0.1, started and stopped by the tests."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 30 s")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory):
    """4 motion classes x 4 videos (3 train + 1 val), 128x96, 1.5 s: real H.264 files and Kinetics CSVs."""
    from slowfast.video.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, classes=4, videos_per_class=4, seed=3, width=128, height=96, seconds=1.5)
    return out


def mlflow_server_in(s3_endpoint: str, tmp_path_factory, bucket: str):
    """`mlflow server` with a sqlite backend, serving artifacts from s3://BUCKET/mlflow on the moto endpoint
    (a generator for a fixture: yields {"url", "s3", "cwd"}, then stops the server).

    Only the server knows the S3 endpoint: clients (the driver, the Ray workers) send artifacts through
    the server's proxy (mlflow-artifacts:/), so they need no S3 credentials of their own.
    """
    import boto3

    tmp = tmp_path_factory.mktemp("mlflow-server")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    # No job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION): its seven huey consumers serve GenAI jobs these
    # tests have none of, on a 2-core machine.
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{bucket}/mlflow",
            ],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own process group: the uvicorn child stops with it
    wait_until_up(proc, f"{url}/health", log, 120)
    yield {"url": url, "s3": s3_endpoint, "cwd": tmp}
    stop_server(proc)


def pipeline_config(tmp: Path, videos: Path, **sections):
    """A small valid PipelineConfig over `videos` (a synth_set copy), with sections overridden."""
    from pipelines.config import PipelineConfig

    data = {
        "dataset": "synth",
        "format": "kinetics_csv",
        "video_root": str(videos),
        "annotations": {"train": str(videos / "annotations/train.csv"), "val": str(videos / "annotations/val.csv")},
    }
    raw = {
        "name": "test",
        "storage_root": str(tmp / "storage"),
        "data": data,
        "preprocess": {"short_side": 48, "clips_per_video": 2, "eval_views": 3, "rows_per_shard": 4},
        "model": {"preset": "slowfast_tiny"},
        "train": {"crop_size": 32, "scale_jitter": [40, 48]},
        "evaluate": {"temporal_views": 3},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return PipelineConfig.model_validate(raw)


INFER_MODEL = "infer-test"


@pytest.fixture(scope="session")
def infer_model(tmp_path_factory, synth_set):
    """slowfast_tiny logged and registered as the registry step logs one; 2 temporal x 3 spatial test views."""
    import torch

    from pipelines import tracking
    from slowfast.model import SlowFast
    from slowfast.serving import ClipSpec

    tmp = tmp_path_factory.mktemp("infer")
    cfg = pipeline_config(
        tmp,
        synth_set,
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "infer", "model_name": INFER_MODEL},
        infer={"commit_every_s": 0.0, "batch_videos": 2},
    )
    torch.manual_seed(0)
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=4))
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    spec = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=2, spatial_crops=3)
    version = tracking.log_model(cfg, run_id, net=net, class_names=["a", "b", "c", "d"], spec=spec, metadata={})
    return cfg, f"models:/{INFER_MODEL}/{version}", tmp


# --- The session's one trained run ----------------------------------------------------------------------------
# A Ray Train run costs ~18 s of controller and worker start on 2 cores before its first step: the tests that need
# "a trained run and its checkpoints" share this one (tests/test_train.py checks how it learnt and logged,
# test_mlflow_server.py that it reads back through the server, test_registry.py evaluates and registers it).

MOTION_BUCKET = "mlflow-server-test"
MOTION_MODEL = "motion"


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """The session's `mlflow server` (mlflow_server_in), its artifacts in s3://MOTION_BUCKET/mlflow."""
    yield from mlflow_server_in(s3_endpoint, tmp_path_factory, MOTION_BUCKET)


def trained_config(tmp: Path, videos: Path, tracking_uri: str):
    """slowfast_tiny at 32 px on the 4-class synthetic set, its Fast pathway on frame differences (as the demo):
    2 DDP workers x 8 clips, 2 epochs of 12 steps (12 train videos x 16 pre-sampled clips), base LR 0.04 (0.01 at
    the global batch of 16) after a quarter epoch of warm-up.

    8 clips a worker, not fewer: batch norm over 4 clips (2 of them often from one video) makes the loss climb at
    this learning rate. 4 videos per shard, so the trainer's read groups mix classes.
    """
    return pipeline_config(
        tmp,
        videos,
        preprocess={"clips_per_video": 16, "rows_per_shard": 64},
        model={"preset": "slowfast_tiny", "fast_input": "time_difference"},
        train={
            "epochs": 2,
            "batch_size": 8,
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "base_lr": 0.04,
            "warmup_epochs": 0.25,
        },
        mlflow={"tracking_uri": tracking_uri, "experiment": "train-test", "model_name": MOTION_MODEL},
        ray={"data_cpus": 1.0},
    )


@dataclass
class TrainedRun:
    cfg: PipelineConfig  # what it was trained with
    out: dict  # pipelines.train.train's summary
    log: list[str]  # what train logged


@pytest.fixture(scope="session")
def trained_run(ray_local, synth_set, mlflow_server, tmp_path_factory) -> TrainedRun:
    """trained_config, trained once through a real local Ray (Ray Train + Ray Data), logging to the session's
    real `mlflow server`. Shared: a test that trains again from it (a resume) copies its storage_root first."""
    from pipelines.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = trained_config(tmp, synth_set, mlflow_server["url"])
    lines: list[str] = []
    return TrainedRun(cfg, train(cfg, log=lines.append), lines)


def skewed_val(tmp: Path, videos: Path) -> str:
    """The val annotations plus one more video of the first class (a train video): 5 val videos, 2 of class
    0, so a constant predictor of class 0 scores 0.4 and of any other class 0.2 (a better and a worse model
    whose figures do not depend on how training went)."""
    import csv

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


def constant_model(checkpoint: Path, out: Path, predicted: int) -> str:
    """The trained checkpoint with its classifier replaced: every video is `predicted` (top-1 = 1/4 here)."""
    import torch

    from pipelines.checkpoints import CHECKPOINT_FILE

    state = torch.load(checkpoint, weights_only=True)
    weight = state["model_state"]["head.fc.weight"]
    state["model_state"]["head.fc.weight"] = torch.zeros_like(weight)
    state["model_state"]["head.fc.bias"] = torch.nn.functional.one_hot(torch.tensor(predicted), len(weight)).float()
    folder = out / f"constant-{predicted}" / "epoch-0001"
    folder.mkdir(parents=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    return str(folder)


@dataclass
class Gate:
    """What the promotion gate did, in order: evaluate, register and promote results."""

    cfg: PipelineConfig  # the trained run's, on the skewed eval set (skewed_val), with its own storage_root
    constants: Path  # the constant models' checkpoints
    weak: dict  # class 1 (0.2): the first model, champion whatever its figure
    first: dict
    better: dict  # class 0 (0.4): registered, then promoted as the challenger (promote's default)
    better_registered: dict
    second: dict
    worse: dict  # class 2 (0.2): registered, rejected
    third: dict
    good: dict  # the trained checkpoint's evaluation, logged to its training run
    good_registered: dict  # registered as the next version; its figure decides nothing here
    good_again: dict  # registered again: the same version


@pytest.fixture(scope="session")
def gate(trained_run, tmp_path_factory) -> Gate:
    """The promotion gate on trained_run's checkpoint, through the session's `mlflow server`, on an eval set where
    constant predictors score known figures (skewed_val). Its own storage_root: the skewed val split is never
    preprocessed into the training's shards (that would be another run identity for test_train's re-run)."""
    from pipelines.checkpoints import CHECKPOINT_FILE
    from pipelines.evaluate import evaluate
    from pipelines.registry import promote, register

    tmp = tmp_path_factory.mktemp("gate")
    raw = trained_run.cfg.model_dump(mode="json")
    raw["storage_root"] = str(tmp / "storage")
    raw["data"]["annotations"]["val"] = skewed_val(tmp, Path(raw["data"]["video_root"]))
    cfg = type(trained_run.cfg).model_validate(raw)
    best = Path(trained_run.out["best_checkpoint"]) / CHECKPOINT_FILE
    constants = tmp / "constants"
    quiet = {"log": lambda *_: None}

    weak = evaluate(cfg, constant_model(best, constants, 1), **quiet)
    first = promote(cfg, register(cfg, weak, **quiet)["model_version"], **quiet)
    better = evaluate(cfg, constant_model(best, constants, 0), **quiet)
    better_registered = register(cfg, better, **quiet)
    second = promote(cfg, **quiet)
    worse = evaluate(cfg, constant_model(best, constants, 2), **quiet)
    third = promote(cfg, register(cfg, worse, **quiet)["model_version"], **quiet)
    good = evaluate(cfg, trained_run.out["best_checkpoint"], **quiet)
    good_registered = register(cfg, good, **quiet)
    good_again = register(cfg, good, **quiet)
    return Gate(
        cfg=cfg,
        constants=constants,
        weak=weak,
        first=first,
        better=better,
        better_registered=better_registered,
        second=second,
        worse=worse,
        third=third,
        good=good,
        good_registered=good_registered,
        good_again=good_again,
    )
