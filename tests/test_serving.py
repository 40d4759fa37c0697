"""Serving a registered version safely: a real `mlflow models serve --env-manager local` on 127.0.0.1 scores base64
video bytes, refuses a file path that exists on the server (never opening it, whatever the request's params say),
answers a corrupt upload with a 400 naming the video and no traceback, and refuses bytes crafted to make FFmpeg read
the server's files (test_untrusted_input.py's) without opening what they name; `python -m pipelines predict` refuses
those files in one line each; locally, mlflow.pyfunc opens paths only with model_config={"allow_paths": True}."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from test_untrusted_input import CRAFTED, Watch, crafted, write_crafted

from pipelines import tracking
from slowfast.model import SlowFast
from slowfast.serving import ClipSpec
from slowfast.video.synth import encode_video, render, sample_video

from conftest import REPO, free_port, pipeline_config, stop_server, wait_until_up

MODEL = "serve-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A fresh slowfast_tiny logged and registered as the registry step logs one (no training needed)."""
    tmp = tmp_path_factory.mktemp("serving")
    video = encode_video(tmp / "clip.mp4", render(sample_video(5, 1, 0, width=96, height=72, seconds=1.5)))
    cfg = pipeline_config(
        tmp, tmp, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "serve", "model_name": MODEL}
    )
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=3))
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    spec = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=1, spatial_crops=1)
    version = tracking.log_model(cfg, run_id, net=net, class_names=["a", "b", "c"], spec=spec, metadata={})
    return {"uri": f"models:/{MODEL}/{version}", "tracking_uri": cfg.mlflow.tracking_uri, "video": video, "tmp": tmp}


@pytest.fixture(scope="module")
def server(registered):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = registered["tmp"] / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # the server execs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(bin_dir) / "mlflow"),
                "models",
                "serve",
                "-m",
                registered["uri"],
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=registered["tmp"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own process group: the uvicorn worker stops with it
    wait_until_up(proc, f"{url}/ping", log, 180)
    yield url
    stop_server(proc)


def invoke(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_rest_scores_base64_bytes(server, registered):
    encoded = base64.b64encode(registered["video"].read_bytes()).decode()
    status, body = invoke(server, {"inputs": [encoded], "params": {"top_k": 2}})
    assert status == 200, body
    row = json.loads(body)["predictions"][0]
    assert len(row["labels"]) == 2 and set(row["labels"]) <= {"a", "b", "c"}
    assert row["scores"][0] >= row["scores"][1] > 0 and sum(row["scores"]) <= 1 + 1e-6


def test_rest_timeline_returns_windows_and_segments_as_json_objects(server, registered):
    encoded = base64.b64encode(registered["video"].read_bytes()).decode()
    status, body = invoke(server, {"inputs": [encoded], "params": {"timeline": True, "stride_s": 0.5, "top_k": 2}})
    assert status == 200, body
    row = json.loads(body)["predictions"][0]
    assert set(row) == {"video", "windows", "segments"}
    # 1.5 s in windows of one clip (16 frames at 30 fps, 0.533 s) every 0.5 s, and a last one ending with the video.
    assert [(w["start_s"], w["end_s"]) for w in row["windows"]] == [(0.0, 0.533), (0.5, 1.033), (0.967, 1.5)]
    assert all(
        len(w["labels"]) == len(w["scores"]) == 2 and set(w["labels"]) <= {"a", "b", "c"} for w in row["windows"]
    )
    assert row["segments"][0]["start_s"] == 0.0 and row["segments"][-1]["end_s"] == 1.5
    tops = [w["labels"][0] for w in row["windows"]]
    runs = [label for i, label in enumerate(tops) if i == 0 or tops[i - 1] != label]
    assert [s["label"] for s in row["segments"]] == runs


def test_rest_refuses_a_million_windows_at_once_naming_the_limit_and_its_key(server, registered):
    encoded = base64.b64encode(registered["video"].read_bytes()).decode()
    started = time.perf_counter()
    status, body = invoke(server, {"inputs": [encoded], "params": {"timeline": True, "stride_s": 1e-6}})
    # Planned before: past 23 GB, then killed. Refused from the header: well under a second on a warm server.
    assert time.perf_counter() - started < 20
    assert status == 400, body
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "Traceback" not in body
    # 1.5 s in windows of one clip (0.533 s) every microsecond: (1.5 - 0.5333) / 1e-6 + 1 of them.
    assert "makes 966,667 windows > max_windows 1,000" in error["message"]
    assert "model_config key 'max_windows'" in error["message"] and "MLFLOW_PYFUNC_INFERENCE_CONFIG" in error["message"]


def test_rest_refuses_a_server_path_even_when_the_request_asks(server, registered):
    path = str(registered["video"])  # a real video the server could read
    for params in ({"top_k": 2}, {"top_k": 2, "allow_paths": True}):
        status, body = invoke(server, {"inputs": [path], "params": params})
        assert status == 400, body
        message = json.loads(body)["message"]
        assert "file paths are refused and never opened" in message and path in message
        assert "labels" not in body and "Traceback" not in body and "stack_trace" not in body


def test_rest_names_a_corrupt_upload_without_a_traceback(server):
    junk = base64.b64encode(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()).decode()
    status, body = invoke(server, {"inputs": [junk]})
    assert status == 400, body
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "video 0 (<video 0: 4096 bytes>)" in error["message"] and "not a video" in error["message"].lower()
    assert "Traceback" not in body and "stack_trace" not in error


@pytest.mark.parametrize("name", CRAFTED)
def test_rest_refuses_crafted_bytes_without_opening_what_they_name(server, registered, name):
    port = free_port()
    case = crafted(name, port)
    with Watch(registered["tmp"], case.target, port) as watch:  # the server's working directory
        status, body = invoke(server, {"inputs": [base64.b64encode(case.data).decode()]})
    assert not watch.opened, f"the server opened {case.target}"
    assert status == 400, body
    message = json.loads(body)["message"]
    assert f"video 0 (<video 0: {len(case.data)} bytes>): " in message and f"not a video file ({case.detail}" in message
    assert "Traceback" not in body and "stack_trace" not in body


@pytest.mark.heavy
def test_predict_cli_refuses_crafted_files_in_one_line_each(registered, tmp_path):
    port = free_port()
    cases = [crafted(name, port) for name in CRAFTED]
    # Each under its telling name (list.ffconcat, local.m3u8, img%03d.png...) and under a .mp4 name.
    files = [(case, path) for case in cases for path in write_crafted(case, tmp_path)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "PYTHONPATH": str(REPO)}
    with contextlib.ExitStack() as stack:
        watches = [stack.enter_context(Watch(tmp_path, case.target, port)) for case in cases]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines",
                "predict",
                *(str(path) for _, path in files),
                "--model-uri",
                registered["uri"],
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert [case.target for case, watch in zip(cases, watches, strict=True) if watch.opened] == []
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for case, path in files:
        said = [line for line in done.stderr.splitlines() if str(path) in line]
        assert len(said) == 1, done.stderr
        assert said[0].startswith(
            f"pipelines predict: cannot classify: VideoDecodeError: {path}: not a video file ({case.detail}"
        ), said[0]


def test_local_pyfunc_opens_paths_only_by_opt_in(registered):
    mlflow.set_tracking_uri(registered["tracking_uri"])
    path = str(registered["video"])
    with pytest.raises(MlflowException, match="file paths are refused"):
        mlflow.pyfunc.load_model(registered["uri"]).predict([path])
    opted_in = mlflow.pyfunc.load_model(registered["uri"], model_config={"allow_paths": True})
    by_path = opted_in.predict([path], params={"top_k": 3})
    by_bytes = opted_in.predict([registered["video"].read_bytes()], params={"top_k": 3})
    assert by_path["video"][0] == path
    assert list(by_path["labels"][0]) == list(by_bytes["labels"][0])
    np.testing.assert_allclose(by_path["scores"][0], by_bytes["scores"][0], atol=1e-6)
