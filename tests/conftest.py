"""Shared test fixtures: a real local Ray, a real S3 endpoint (moto_server on 127.0.0.1), and a
small synthetic Kinetics-format video set encoded with PyAV."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Dummy credentials for the local S3 endpoint, set before any Ray worker starts so workers inherit
# them; never real ones (the standard AWS chain would otherwise find a developer's own).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]

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
    import ray

    def refuse(*_, **__):
        pytest.fail("this test is not for `make check`: it starts a subprocess or Ray; mark it @pytest.mark.heavy")

    subprocess.Popen.__init__ = refuse
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
