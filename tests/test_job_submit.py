"""`ray job submit` against a real head node: `ray start --head` (token authentication on, as Ray 2.60 does
for local clusters), the workflow submitted with the working dir and cluster/runtime_env.local.yaml, polled
until SUCCEEDED, then the registered model read back from MLflow."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.mark.heavy  # a Ray head of its own
def test_ray_job_submit_runs_the_workflow_and_registers_a_model(synth_set, tmp_path):
    port, dashboard = free_port(), free_port()
    # The token goes by environment (RAY_AUTH_TOKEN), so the test never touches ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    # As after `source .venv/bin/activate`: the job's `python` is the one the head node runs on.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Every port the head opens is a free one: the test session's own local Ray holds Ray's defaults (the
    # dashboard agent's 52365 among them), and a second agent on the same port never comes up.
    agent_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    head = subprocess.Popen(
        [
            ray_cli(),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            *agent_ports,
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head, tmp_path / "head.log")
        out = tmp_path / "job"
        videos = synth_set
        submission = f"test-{secrets.token_hex(4)}"
        # Exactly the README's command, with absolute paths (the job runs in Ray's copy of the working dir).
        command = [
            ray_cli(),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env",
            "cluster/runtime_env.local.yaml",
            "--submission-id",
            submission,
            "--no-wait",
            "--",
            "python",
            "-m",
            "pipelines",
            "run",
            "--config",
            "configs/demo.yaml",
            "--set",
            f"storage_root={out}",
            "--set",
            f"data.video_root={videos}",
            "--set",
            f"data.annotations.train={videos / 'annotations/train.csv'}",
            "--set",
            f"data.annotations.val={videos / 'annotations/val.csv'}",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "--set",
            "mlflow.model_name=job-test",
            "--set",
            "preprocess.short_side=48",
            "--set",
            "preprocess.eval_views=2",
            "--set",
            "evaluate.temporal_views=2",
            "--set",
            "train.crop_size=32",
            "--set",
            "train.scale_jitter=[40,48]",
            "--set",
            "train.epochs=1",
            "--set",
            "train.warmup_epochs=0",
            "--set",
            "train.batch_size=4",
        ]
        # The dashboard answers before the head's job agent is up ("No available agent ... try again later").
        for _ in range(30):
            submit = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        status = _wait_for_job(address, submission, env, timeout=900)
        logs = subprocess.run(
            [ray_cli(), "job", "logs", "--address", address, submission],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert status == "SUCCEEDED", logs[-4000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this head only: `ray stop` would stop every Ray on the machine
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()

    assert "summary: run " in logs and "models:/job-test/1" in logs
    summaries = list((out / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["model_uri"] == "models:/job-test/1" and summary["promoted"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("job-test", "champion")
    assert str(champion.version) == "1" and champion.tags["slowfast.promotion.decision"] == "promoted"


def _wait_for_dashboard(address: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError as exc:  # refused while starting; 401 once up with token auth (an HTTPError is an OSError)
            if getattr(exc, "code", None) in (401, 403):
                return
            time.sleep(1)
    raise AssertionError(f"the dashboard at {address} did not come up: {log.read_text()[-3000:]}")


def _wait_for_job(address: str, submission: str, env: dict, timeout: float) -> str:
    deadline = time.time() + timeout
    status = "UNKNOWN"
    while time.time() < deadline:
        done = subprocess.run(
            [ray_cli(), "job", "status", "--address", address, submission],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
        # `ray job status` says "Job '<id>' succeeded" / "failed" / "was stopped", or "Status for job ...: RUNNING".
        for word, said in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
            if f"Job '{submission}' {said}" in out:
                return word
        status = out.strip().splitlines()[-1] if out.strip() else status
        time.sleep(3)
    raise AssertionError(f"job {submission} not finished after {timeout}s: {status}")
